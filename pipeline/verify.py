"""python -m pipeline.verify: prove what a collection holds.

  python -m pipeline.verify --bucket B --collection C
      (--bigquery_table P:D.T | --bigquery_project P | --metadata_output DIR)
      [--read_data | --read_data_fraction F] [--input ROOT ...] [--report PATH]

Checks every current row against its object and every object against its
rows (transforms/verify.py); with --read_data reads every member (or a
fixed fraction of them) and hashes it; with --input accounts for every
input file by the rules of a run (a plan of it) and proves that no flagged
file's bytes are in the collection. Writes nothing to the bucket or the
table: only its report (JSON and HTML). Exit 0: everything holds; 1: a
problem, each named in the report; 2: it cannot start.
"""
import argparse
import datetime
import json
import os
import posixpath
import sys
import tempfile
import uuid
from typing import Any, Dict, List, Optional

from apache_beam.io.filesystems import FileSystems

from pipeline import __version__
from pipeline.console import (Console, duration, eta, live_progress,
                              megabytes, run_log)
from pipeline.cli import OneLineParser, OptionsError, env_bucket, rows_table
from transforms import report_html
from transforms.access import AccessError, check_cloud_access
from transforms.files import file_digest
from transforms.keys import UnsafeKeyComponent, check_collection, join_uri
from transforms.local_sql import LocalRows, QueryError
from transforms.report import write_report
from transforms.sinks import write_text_file
from transforms.verify import (DEFAULT_WORKERS, KINDS, Findings,
                               check_stored_inputs, list_objects, rows_sql,
                               verify_collection)

SHOWN_PROBLEMS = 10


def _parser() -> argparse.ArgumentParser:
  p = OneLineParser(prog="python -m pipeline.verify",
                    description=__doc__.split("\n\n")[0], allow_abbrev=False)
  p.add_argument("--bucket", default=env_bucket(),
                 help="where the study objects are: gs://BUCKET or a local "
                      "folder (default: $GOOGLE_CLOUD_STORAGE)")
  p.add_argument("--collection",
                 default=os.environ.get("GOOGLE_STORAGE_COLLECTION"),
                 help="the collection (default: $GOOGLE_STORAGE_COLLECTION)")
  rows = p.add_mutually_exclusive_group()
  rows.add_argument("--bigquery_table", metavar="PROJECT:DATASET.TABLE")
  rows.add_argument("--bigquery_project",
                    help="rows in PROJECT:<collection>.dicom")
  rows.add_argument("--metadata_output", metavar="DIR",
                    help="a folder of local row files")
  data = p.add_mutually_exclusive_group()
  data.add_argument("--read_data", action="store_true",
                    help="read every member back and hash it")
  data.add_argument("--read_data_fraction", type=float, metavar="F",
                    help="read a fraction F of the members (the same ones "
                         "on every run with the same F)")
  p.add_argument("--input", action="append", default=[], metavar="ROOT",
                 help="input roots (as a run's --input): account for every "
                      "input file, and prove no flagged file is stored")
  for name, help_ in (("--phi_rules", "PHI rules, as the run's"),
                      ("--deid_recipe", "deid recipe, as the run's"),
                      ("--item_id", "item id keyword, as the run's"),
                      ("--entities_file", "entities, as the run's")):
    p.add_argument(name, help=help_ + " (with --input)")
  p.add_argument("--report", help="the JSON report (and .html beside it); "
                                  "default ./verify-<id>/verify.json")
  p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                 help=f"objects checked at once (default {DEFAULT_WORKERS})")
  return p


class VerifyProgress:
  """0:12 ETA 0:30 | 340/1,200 objects | 41,000 rows | 120 MB read | 2
  problems"""

  def __init__(self, objects: int):
    self.objects = objects

  def __call__(self, c: Dict[str, int], elapsed: float) -> str:
    done = c["objects_checked"]
    head = duration(elapsed) + eta(
        elapsed, done / self.objects if self.objects else 0)
    parts = [head, f"{done:,}/{self.objects:,} objects",
             f"{c['rows_checked']:,} rows",
             f"{megabytes(c['bytes_read'])} read"]
    if c["input_files_checked"]:
      parts.append(f"{c['input_files_checked']:,} input files")
    parts.append(f"{c['problems']:,} problems")
    return " | ".join(parts)


def _rows(table: Optional[str], metadata_output: Optional[str]):
  """The current rows, ordered by object."""
  if table:
    from transforms.bigquery import CURRENT_VIEW_SUFFIX, query_rows, sql_table
    return query_rows(table, rows_sql(sql_table(table, CURRENT_VIEW_SUFFIX)),
                      {})
  return LocalRows(metadata_output).query(rows_sql("dicom_current"))[1]


def _plan(args, table: Optional[str], folder: str) -> Dict[str, Any]:
  """A plan of a run over the input (nothing written): the rules of a run
  say what each input file is."""
  from pipeline.run import run
  argv = [f"--input={','.join(args.input)}", f"--bucket={args.bucket}",
          f"--collection={args.collection}", "--plan",
          f"--report={join_uri(folder, 'plan.json')}"]
  argv.append(f"--bigquery_table={table}" if table
              else f"--metadata_output={args.metadata_output}")
  for name in ("phi_rules", "deid_recipe", "item_id", "entities_file"):
    if getattr(args, name):
      argv.append(f"--{name}={getattr(args, name)}")
  return run(argv)


def _check_input(plan: Dict[str, Any], findings: Findings, gcs) -> frozenset:
  """Every input file by its plan: a file that would be stored must be in
  its study's object (hash for hash); returns the SHA-256 of every flagged
  file."""
  listing = posixpath.dirname(plan["stored_files"])
  for study in plan["studies"]:
    name = posixpath.basename(study["uri"])[:-len(".tar.gz")] + ".json"
    with FileSystems.open(join_uri(listing, name)) as f:
      lines = [json.loads(line) for line in f.read().decode().splitlines()
               if line]
    if study["outcome"] == "to write":
      for line in lines:
        findings.add(input_files_checked=1)
        findings.problem("input_not_stored", line["object"], path=line["path"],
                         detail="its study is not stored as it is now (a run "
                                "would write it)")
    else:
      check_stored_inputs(lines, findings, gcs)
  for item in plan["failed"]:
    findings.problem("input_not_checked", "", path=item["path"],
                     detail=item["reason"])
  findings.add(input_files_checked=len(plan["flagged"]) + len(
      plan["rejected"]) + len(plan["failed"]))
  return frozenset(file_digest(item["path"]).hexdigest() for item in plan["flagged"])


def verify(args, console: Optional[Console], verify_id: str
           ) -> Dict[str, Any]:
  """Runs every check; returns the report (also written, JSON and HTML).
  Raises OptionsError, QueryError or AccessError before any check."""
  if not args.bucket or not args.collection:
    raise OptionsError("--bucket and --collection are required")
  try:
    check_collection(args.collection)
  except UnsafeKeyComponent as e:
    raise OptionsError(f"--collection: {e}") from e
  table = rows_table(args)
  if not table and not args.metadata_output:
    raise OptionsError("where are the rows? --bigquery_table, "
                       "--bigquery_project or --metadata_output")
  fraction = 1.0 if args.read_data else (args.read_data_fraction or 0.0)
  if not 0 <= fraction <= 1:
    raise OptionsError("--read_data_fraction must be between 0 and 1")
  if args.workers < 1:
    raise OptionsError("--workers must be at least 1")
  bucket = args.bucket.rstrip("/")
  if "://" not in bucket:
    bucket = os.path.abspath(bucket)
  check_cloud_access(bucket, table)
  gcs = None
  if bucket.startswith("gs://"):
    from transforms.gcs import storage_client
    gcs = storage_client()
  report_path = os.path.abspath(args.report) if args.report and (
      "://" not in args.report) else args.report or os.path.abspath(
          f"verify-{verify_id}/verify.json")
  findings = Findings()
  flagged = frozenset()
  with run_log(join_uri(posixpath.dirname(report_path),
                        f"verify-{verify_id}.log")):
    if args.input:
      with tempfile.TemporaryDirectory(prefix="dicomstore-verify-") as tmp:
        flagged = _check_input(_plan(args, table, tmp), findings, gcs)
    try:
      objects = list_objects(bucket, args.collection, gcs)
      rows = _rows(table, args.metadata_output)
    except Exception as e:  # pylint: disable=broad-except
      raise QueryError(f"the collection cannot be listed: "
                       f"{str(e).splitlines()[0]}") from e
    if console:
      console.line(f"Verifying {len(objects):,} objects of {bucket}/"
                   f"Collection/{args.collection}/ against "
                   f"{table or args.metadata_output}"
                   + (f", reading {fraction:.0%} of the members"
                      if fraction else ""))
    with live_progress(console, findings.snapshot,
                       VerifyProgress(len(objects))):
      verify_collection(objects, rows, findings, fraction, flagged,
                        args.workers, gcs)
  report = {
      "verify": True, "run_id": verify_id, "pipeline_version": __version__,
      "collection": args.collection, "bucket": bucket,
      "rows": table or args.metadata_output, "read_data_fraction": fraction,
      "input": args.input, "flagged_files_checked": len(flagged),
      "summary": {**findings.snapshot(),
                  **{k: len(v) for k, v in findings.problems.items() if v}},
      "problems": findings.problems, "kinds": KINDS,
      "report_path": report_path,
      "report_page": report_html.html_path(report_path),
  }
  write_report(report_path, report)
  write_text_file(report["report_page"], report_html.render(report))
  return report


def main(argv: Optional[List[str]] = None) -> int:
  args = _parser().parse_args(argv)
  console = Console()
  verify_id = (datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8])
  with console.logging_to_console(verbose=False):
    try:
      report = verify(args, console, verify_id)
    except (OptionsError, QueryError, AccessError) as e:
      console.line(f"error: {e}", sys.stderr)
      return 2
  s = report["summary"]
  console.line(
      f"Verified {s['objects_checked']:,} objects and {s['rows_checked']:,} "
      f"current rows"
      + (f", read {s['members_read']:,} members" if s["members_read"] else "")
      + (f", {s['input_files_checked']:,} input files"
         if s["input_files_checked"] else "")
      + f": {s['problems']:,} problems")
  for kind, items in report["problems"].items():
    for item in items[:SHOWN_PROBLEMS]:
      facts = ", ".join(f"{k} {v}" for k, v in item.items() if k != "object")
      console.line(f"  {kind}: {item['object']}: {facts}", sys.stderr)
    if len(items) > SHOWN_PROBLEMS:
      console.line(f"  ... {len(items) - SHOWN_PROBLEMS:,} more {kind}",
                   sys.stderr)
  console.line(f"  report {report['report_page']} (and "
               f"{report['report_path']})")
  return 1 if s["problems"] else 0


if __name__ == "__main__":
  sys.exit(main())
