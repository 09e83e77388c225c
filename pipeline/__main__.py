"""python -m pipeline --input DIR --bucket DIR --collection C --metadata_output DIR"""
import atexit
import logging
import os
import sys

from pipeline import lazy_imports, local_workers

with lazy_imports.without_collection():
  # Before Beam is imported: the workers' imports overlap the driver's, and
  # the driver of a local run leaves unused cloud clients unloaded and
  # unused optional libraries out.
  local_workers.start_early(sys.argv[1:])
  if local_workers.runs_locally(sys.argv[1:]):
    lazy_imports.defer_cloud_clients()
    lazy_imports.leave_out_unused()
  from pipeline.run import main  # pylint: disable=wrong-import-position


def exit_now(code: int) -> None:
  """Exits like sys.exit (exit handlers run, output flushed) but skips the
  interpreter's teardown of Beam's and gRPC's objects, which took ~0.7 s
  after every run and does nothing for the user. Every file the run writes
  is closed before main() returns."""
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


if __name__ == "__main__":
  logging.getLogger().setLevel(logging.INFO)
  exit_now(main())
