"""python -m pipeline.export: a cohort, from a query to verified DICOM files.

  python -m pipeline.export (--bigquery_table PROJECT:DATASET.TABLE | --metadata_output DIR)
      (--where "CONDITION" | --sql @FILE.sql) [--param NAME[:TYPE]=VALUE ...]
      --out DIR [--layout uid|member] [--workers N]

The images of the current rows that the condition (or the query's
sop_instance_uid column) selects land in DIR, by default at
DIR/<entity>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm,
with DIR/manifest.csv. Run it again to resume: files already there with
the right hash are kept, the rest are read.
"""
import argparse
import sys
import threading
from typing import List, Optional

from pipeline.console import (Console, RecentRate, duration, eta,
                              live_progress, megabytes)
from pipeline.cli import OneLineParser, OptionsError, rows_table
from transforms.access import AccessError, check_cloud_access
from transforms.export import (DEFAULT_WORKERS, FAILED, LAYOUTS, MANIFEST,
                               ExportStats, count_sql, export_cohort,
                               selection_sql)
from transforms.local_sql import (LocalRows, QueryError, on_table,
                                  parse_parameters, read_sql)

SHOWN_FAILURES = 5


def _parser() -> argparse.ArgumentParser:
  p = OneLineParser(
      prog="python -m pipeline.export", description=__doc__.split("\n\n")[0],
      allow_abbrev=False)
  rows = p.add_mutually_exclusive_group(required=True)
  rows.add_argument("--bigquery_table", metavar="PROJECT:DATASET.TABLE",
                    help="the rows' table (its _current view is read)")
  rows.add_argument("--metadata_output", metavar="DIR",
                    help="a folder of local row files (rows-*.json)")
  which = p.add_mutually_exclusive_group(required=True)
  which.add_argument("--where", metavar="CONDITION",
                     help="SQL condition over the row columns, e.g. "
                          "\"Modality = 'CT' AND JSON_VALUE(metadata, "
                          "'$.BodyPartExamined') = 'CHEST'\"")
  which.add_argument("--sql", metavar="QUERY|@FILE.sql",
                     help="a query returning sop_instance_uid (BigQuery SQL)")
  p.add_argument("--param", action="append", default=[],
                 metavar="NAME[:TYPE]=VALUE", help="a value for @NAME")
  p.add_argument("--out", required=True, help="the folder to export to")
  p.add_argument("--layout", choices=LAYOUTS, default="uid",
                 help="uid: <entity>/<study>/<series>/<sop>.dcm (default); "
                      "member: each image's original path below its entity")
  p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                 help=f"objects read at once (default {DEFAULT_WORKERS})")
  return p


class ExportProgress:
  """0:12 ETA 0:30 | 340/1,200 images, 12 already there | 120 MB of 400 MB,
  35.2 MB/s | 2 failed"""

  def __init__(self):
    self._rate = RecentRate()

  def __call__(self, c, elapsed: float) -> str:
    done = c["exported"] + c["present"] + c["failed"]
    head = duration(elapsed) + eta(
        elapsed, c["bytes_done"] / c["bytes"] if c["bytes"] else 0)
    parts = [head, f"{done:,}/{c['images']:,} images"
             + (f", {c['present']:,} already there" if c["present"] else ""),
             f"{megabytes(c['bytes_done'])} of {megabytes(c['bytes'])}, "
             f"{self._rate(elapsed, c['bytes_done'])}"]
    if c["failed"]:
      parts.append(f"{c['failed']:,} failed")
    return " | ".join(parts)


def _rows_and_count(args, params):
  """(selected rows, ordered by object; (images, bytes) they come to)."""
  if args.bigquery_table:
    from transforms.bigquery import CURRENT_VIEW_SUFFIX, query_rows, sql_table
    selection = selection_sql(
        sql_table(args.bigquery_table, CURRENT_VIEW_SUFFIX), args.where,
        on_table(read_sql(args.sql), args.bigquery_table) if args.sql
        else None)
    count = next(iter(query_rows(args.bigquery_table, count_sql(selection),
                                 params)))
    return query_rows(args.bigquery_table, selection, params), count
  local = LocalRows(args.metadata_output)
  selection = selection_sql("dicom_current", args.where,
                            read_sql(args.sql) if args.sql else None)
  count = next(local.query(count_sql(selection), params)[1])
  return local.query(selection, params)[1], count


class _LazyStorageClient:
  """One Cloud Storage client for every thread, made when first needed
  (never for a cohort in a local bucket)."""

  def __init__(self):
    self._client = None
    self._lock = threading.Lock()

  def bucket(self, name):
    with self._lock:
      if self._client is None:
        from transforms.gcs import storage_client
        self._client = storage_client()
    return self._client.bucket(name)


def main(argv: Optional[List[str]] = None) -> int:
  args = _parser().parse_args(argv)
  console = Console()
  with console.logging_to_console(verbose=False):
    try:
      if args.workers < 1:
        raise QueryError("--workers must be at least 1")
      if rows_table(args):
        check_cloud_access("gs://", args.bigquery_table)
      rows, count = _rows_and_count(args, parse_parameters(args.param))
    except (OptionsError, QueryError, AccessError) as e:
      console.line(f"error: {e}", sys.stderr)
      return 2
    except Exception as e:  # pylint: disable=broad-except
      console.line(f"error: the rows cannot be queried: "
                   f"{str(e).splitlines()[0]}", sys.stderr)
      return 2
    stats = ExportStats(count["images"] or 0, count["bytes"] or 0)
    console.line(f"Exporting {stats.images:,} images "
                 f"({megabytes(stats.bytes)}) to {args.out}")
    with live_progress(console, stats.snapshot, ExportProgress()):
      listed, failures = export_cohort(rows, args.out, args.layout, stats,
                                       args.workers, _LazyStorageClient())
  s = stats.snapshot()
  console.line(
      f"Exported {listed:,} images to {args.out}: {s['exported']:,} "
      f"written, {s['present']:,} already there (same SHA-256, not read "
      f"again); read {megabytes(s['bytes_read'])} in {s['requests']:,} requests "
      f"for {megabytes(s['member_bytes'])} of images compressed")
  console.line(f"  manifest {args.out}/{MANIFEST}")
  if failures:
    for image, reason in failures[:SHOWN_FAILURES]:
      console.line(f"  failed: {image.sop_instance_uid}: {reason}",
                   sys.stderr)
    console.line(f"error: {len(failures):,} images could not be had; all "
                 f"listed with their reasons in {args.out}/{FAILED}",
                 sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
