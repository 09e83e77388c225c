"""Write one image's original DICOM bytes, fetched with one ranged read.

  python -m pipeline.fetch --uri URI --offset N --length M [--sha256 HEX] [--out FILE]
  python -m pipeline.fetch --sop_instance_uid UID --metadata_output DIR [--out FILE]
  python -m pipeline.fetch --sop_instance_uid UID --bigquery_table P:D.T [--out FILE]

Without --out (or with --out -) the bytes go to standard output.
"""

import argparse
import sys
from typing import List, Optional

from transforms.retrieve import RetrievalError, fetch_member, find_row_in_folder


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m pipeline.fetch",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--uri", help="study object (gs://... or a local path)")
  p.add_argument("--offset", type=int, help="storage.member_offset")
  p.add_argument("--length", type=int, help="storage.member_length")
  p.add_argument("--sha256", help="storage.member_sha256, to verify")
  p.add_argument("--sop_instance_uid", help="look the image up by its UID")
  p.add_argument("--metadata_output", help="local rows folder to look in")
  p.add_argument("--bigquery_table", help="PROJECT:DATASET.TABLE to look in")
  p.add_argument("--out", default="-", help="file to write, or - for stdout")
  return p


def _lookup(args) -> dict:
  if args.metadata_output:
    row = find_row_in_folder(args.metadata_output, args.sop_instance_uid)
  elif args.bigquery_table:
    from transforms.bigquery import find_row_in_table
    row = find_row_in_table(args.bigquery_table, args.sop_instance_uid)
  else:
    raise RetrievalError("--sop_instance_uid needs --metadata_output or "
                         "--bigquery_table")
  if row is None:
    raise RetrievalError(f"no row for SOPInstanceUID {args.sop_instance_uid}")
  return row["storage"]


def main(argv: Optional[List[str]] = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.sop_instance_uid:
      st = _lookup(args)
      uri, offset, length = st["uri"], st["member_offset"], st["member_length"]
      sha256 = st.get("member_sha256")
    elif args.uri and args.offset is not None and args.length is not None:
      uri, offset, length, sha256 = args.uri, args.offset, args.length, args.sha256
    else:
      raise RetrievalError("give --uri, --offset and --length, or "
                           "--sop_instance_uid with where to look it up")
    name, content = fetch_member(uri, offset, length, sha256)
  except (RetrievalError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if args.out == "-":
    sys.stdout.buffer.write(content)
    sys.stdout.buffer.flush()
  else:
    with open(args.out, "wb") as f:
      f.write(content)
    print(f"{name}: {len(content)} bytes -> {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
