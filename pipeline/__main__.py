"""python -m pipeline --input DIR --bucket DIR --collection C --metadata_output DIR"""
import logging
import sys

from pipeline.run import main

if __name__ == "__main__":
  logging.getLogger().setLevel(logging.INFO)
  sys.exit(main())
