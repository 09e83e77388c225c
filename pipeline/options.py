"""The pipeline's own options, with defaults from the original system's
environment variables, and the checks that run before any work."""

import argparse
import dataclasses
import difflib
import hashlib
import json
import os
import posixpath
from typing import List, Optional

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (PipelineOptions,
                                                  _BeamArgumentParser)

from pipeline import __version__
from pipeline.cli import OptionsError, env_bucket, rows_table
from transforms import dicom, discover, phi, studies
from transforms.archive_format import DEFAULT_COMPRESSION_LEVEL
from transforms.lease import DEFAULT_LEASE_SECONDS
from transforms.keys import (UnsafeKeyComponent, check_collection,
                             check_key_component, join_uri)


def _flag(value: str) -> bool:
  """--overwrite, --overwrite=true/false (flex templates pass a value)."""
  if value.lower() in ("true", "1", "yes"):
    return True
  if value.lower() in ("false", "0", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, not {value!r}")


# A switch: --plan alone, or --plan=true/false as flex templates pass it.
FLAG = dict(type=_flag, nargs="?", const=True, default=False)


class StorageOptions(PipelineOptions):
  """Options of the DICOM storage step (standard Beam options pass through)."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
        "--input",
        help="Folder, or glob of folders, whose immediate subfolders are "
             "entities (patients); several separated by commas. Local paths "
             "or gs:// prefixes.")
    parser.add_argument(
        "--bucket", default=env_bucket(),
        help="Destination for study objects: gs://BUCKET or a local folder. "
             "Default: $GOOGLE_CLOUD_STORAGE (a bare name means gs://NAME).")
    parser.add_argument(
        "--collection", default=os.environ.get("GOOGLE_STORAGE_COLLECTION"),
        help="Collection (e.g. IRB number): letters, digits, underscores. "
             "Names the key prefix and the BigQuery dataset. "
             "Default: $GOOGLE_STORAGE_COLLECTION.")
    parser.add_argument(
        "--metadata_output",
        help="Folder for the rows as newline-delimited JSON, files named "
             "by run (rows-<run id>-*.json), with schema.json, for "
             "`bq load`.")
    parser.add_argument(
        "--dead_letter",
        help="Folder for rows that could not be written, as newline-"
             "delimited JSON with the error. Default: "
             "<metadata_output>/dead_letter, else "
             "<bucket>/Runs/<collection>/<run id>/dead_letter.")
    parser.add_argument(
        "--report",
        help="Path of the JSON run report. Default: "
             "<metadata_output>/report.json, else "
             "<bucket>/Runs/<collection>/<run id>/report.json.")
    parser.add_argument(
        "--item_id", default=studies.DEFAULT_ITEM_KEYWORD,
        help="DICOM keyword whose value names a study's object "
             "(<entity>_<date>_<item>.tar.gz). Default: AccessionNumber; "
             "a study without one gets an id derived from its UID.")
    parser.add_argument(
        "--phi_rules", default=",".join(phi.DEFAULT_RULES),
        help="Comma-separated PHI rules; a flagged image is never stored. "
             "folder: under a PHI/ folder; header: BurnedInAnnotation=YES; "
             "deid: the deid package's burned-in pixel detector.")
    parser.add_argument(
        "--deid_recipe",
        help="deid recipe file for the 'deid' rule (its %%filter groups). "
             "Default: deid's own 'dicom' recipe.")
    parser.add_argument(
        "--compression_level", type=int, default=DEFAULT_COMPRESSION_LEVEL,
        help="ISA-L gzip level 0-3 for images of 512 KiB and more (from 64 "
             "to 512 KiB: libdeflate level 1; under 64 KiB: ISA-L level 3). "
             "Default: 2.")
    parser.add_argument(
        "--entities_file",
        help="Text file (local or gs://) listing the entity ids to process, "
             "one per line; other entity folders are left alone.")
    parser.add_argument(
        "--overwrite", **FLAG,
        help="Rewrite every study object and its rows, even when the stored "
             "object already holds exactly these images.")
    parser.add_argument(
        "--bigquery_project", default=os.environ.get("GOOGLE_PROJECT_NAME"),
        help="Send rows to BigQuery table PROJECT:<collection>.dicom. "
             "Default: $GOOGLE_PROJECT_NAME.")
    parser.add_argument(
        "--bigquery_table",
        help="Send rows to this table instead: PROJECT:DATASET.TABLE.")
    parser.add_argument(
        "--full_scan", **FLAG,
        help="Read every file, even of entity folders that are unchanged "
             "since earlier runs (same paths, sizes and modification times "
             "or generations): what --overwrite does too.")
    parser.add_argument(
        "--on_busy", choices=["exit", "wait"], default="exit",
        help="When another run holds the collection's lease: exit at once "
             "with status 3 (default), or wait for it.")
    parser.add_argument(
        "--lease_seconds", type=float, default=DEFAULT_LEASE_SECONDS,
        help="How long the collection's lease outlives its last renewal "
             "(renewed every third of it): a killed run blocks the next one "
             f"at most this long. Default: {DEFAULT_LEASE_SECONDS}.")
    parser.add_argument(
        "--plan", **FLAG,
        help="A dry run for review: list, read headers, apply the PHI rules, "
             "group studies and decide what each would be (written, rows "
             "completed, skipped); write no object, no row, no dead letter. "
             "The report (JSON and HTML) says what a run would do. Default "
             "report: <metadata_output>/plan.json, else "
             "./plan-<run id>/plan.json (never in the bucket).")
    parser.add_argument(
        "--verbose", **FLAG,
        help="Show every log line on the console (Beam's and the workers' "
             "too). Every run's full log is in run-<run id>.log beside the "
             "report either way.")
    parser.add_argument(
        "--bigquery_method", default="STREAMING_INSERTS",
        choices=["STREAMING_INSERTS", "FILE_LOADS"],
        help="How rows reach BigQuery: STREAMING_INSERTS (as studies finish) "
             "or FILE_LOADS (load jobs, for large backfills).")


class _RaisingParser(_BeamArgumentParser):
  """Beam's parser, raising OptionsError instead of printing usage."""

  def error(self, message):
    raise OptionsError(message)


def check_arguments(argv: List[str]) -> None:
  """Every argument must be an option of this pipeline or of Beam.

  Beam drops an argument it does not know with a warning and runs on: a
  misspelled --phi_rules would store images without the rule asked for.
  Raises OptionsError naming the argument and the closest known option.
  """
  parser = _RaisingParser(allow_abbrev=False, add_help=False)
  # Every options class Beam itself would parse with (as get_all_options).
  classes = {}
  for cls in PipelineOptions.__subclasses__():
    classes.setdefault(str(cls), cls)
  for cls in classes.values():
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  _, unknown = parser.parse_known_args(argv)
  if not unknown:
    return
  arg = next((a for a in unknown if a.startswith("-")), unknown[0])
  if not arg.startswith("-"):
    raise OptionsError(f"unexpected argument {arg!r}: options are written "
                       "--name=value (see --help)")
  name = arg.split("=", 1)[0]
  known = [o for action in parser._actions  # pylint: disable=protected-access
           for o in action.option_strings]
  close = difflib.get_close_matches(name, known, n=1)
  hint = f"; did you mean {close[0]}?" if close else " (see --help)"
  raise OptionsError(f"unknown option {name}{hint}")


def verbose_requested(argv: List[str]) -> bool:
  """--verbose among the arguments, read before the options are (the
  console is set up first)."""
  value = None
  for arg in argv:
    if arg == "--verbose":
      value = "true"
    elif arg.startswith("--verbose="):
      value = arg.split("=", 1)[1]
  try:
    return value is not None and _flag(value)
  except argparse.ArgumentTypeError:
    return False


def help_text() -> str:
  """--help: this pipeline's own options (Beam's own pass through)."""
  parser = argparse.ArgumentParser(
      prog="python -m pipeline",
      description="Store de-identified DICOM entity folders as one .tar.gz "
                  "per study, with one metadata row per image.",
      epilog="Standard Beam options (--runner, --project, --region, "
             "--temp_location, --direct_num_workers, ...) pass through.")
  StorageOptions._add_argparse_args(parser)  # pylint: disable=protected-access
  return parser.format_help()


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Checked, resolved settings of one run."""
  input_roots: List[str]
  bucket: str
  collection: str
  metadata_output: Optional[str]
  dead_letter: str
  report: str
  log: str                            # run-<run id>.log, beside the report
  item_id: str
  phi_rules: List[str]
  deid_recipe_text: Optional[str]
  compression_level: int
  entities: Optional[List[str]]
  overwrite: bool
  full_scan: bool
  bigquery_table: Optional[str]       # PROJECT:DATASET.TABLE
  bigquery_method: str
  plan: bool = False                  # decide, write nothing but the report
  on_busy: str = "exit"               # another run holds the lease: or wait
  lease_seconds: float = DEFAULT_LEASE_SECONDS
  # Fingerprint of what decides each file's outcome (PHI rules, deid recipe,
  # item id, pipeline version): recorded facts made under other rules are
  # not reused.
  rules_id: str = ""


def _absolute(path: Optional[str]) -> Optional[str]:
  if path and "://" not in path:
    return os.path.abspath(path)
  return path


def resolve(opts: StorageOptions, run_id: str) -> RunConfig:
  """Checks the options; raises OptionsError naming the first bad one."""
  if not opts.input:
    raise OptionsError("--input is required: the folder of entity folders")
  if not opts.bucket:
    raise OptionsError("--bucket is required (or set GOOGLE_CLOUD_STORAGE)")
  if not opts.collection:
    raise OptionsError(
        "--collection is required (or set GOOGLE_STORAGE_COLLECTION)")
  try:
    check_collection(opts.collection)
  except UnsafeKeyComponent as e:
    raise OptionsError(f"--collection: {e}") from e
  table = rows_table(opts)
  if not opts.metadata_output and not table:
    raise OptionsError("--metadata_output or --bigquery_project is required: "
                       "where rows go")
  try:
    roots = [_absolute(r) for r in discover.split_input_roots(opts.input)]
    rules = [r.strip() for r in opts.phi_rules.split(",") if r.strip()]
    phi.check_rule_names(rules)
  except ValueError as e:
    raise OptionsError(str(e)) from e
  try:
    dicom.check_keyword(opts.item_id)
  except ValueError as e:
    raise OptionsError(f"--item_id: {e}") from e
  if opts.lease_seconds < 3:
    raise OptionsError("--lease_seconds must be at least 3")
  if not 0 <= opts.compression_level <= 3:
    raise OptionsError("--compression_level must be 0, 1, 2 or 3")
  recipe_text = None
  if opts.deid_recipe:
    if "deid" not in rules:
      raise OptionsError("--deid_recipe needs 'deid' in --phi_rules")
    recipe_text = _read_text(opts.deid_recipe, "--deid_recipe")
  entities = None
  if opts.entities_file:
    entities = [line.strip() for line in _read_text(
        opts.entities_file, "--entities_file").splitlines()
                if line.strip() and not line.startswith("#")]
    if not entities:
      raise OptionsError("--entities_file lists no entity ids")
    try:
      for entity in entities:
        check_key_component(entity, "entity id")
    except UnsafeKeyComponent as e:
      raise OptionsError(f"--entities_file: {e}") from e
  metadata_output = _absolute(opts.metadata_output)
  bucket = _absolute(opts.bucket).rstrip("/")
  # Without a local rows folder, the report and dead letters go to the
  # bucket, beside (never under) the Collection/ key schema.
  side = metadata_output or join_uri(bucket, f"Runs/{opts.collection}/{run_id}")
  report = _absolute(opts.report) or join_uri(side, "report.json")
  if opts.plan and not opts.report:
    # A plan writes nothing to the bucket, its report included.
    report = join_uri(metadata_output or os.path.abspath(f"plan-{run_id}"),
                      "plan.json")
  return RunConfig(
      input_roots=roots, bucket=bucket,
      collection=opts.collection, metadata_output=metadata_output,
      dead_letter=_absolute(opts.dead_letter) or join_uri(side, "dead_letter"),
      report=report,
      log=join_uri(posixpath.dirname(report), f"run-{run_id}.log"),
      item_id=opts.item_id, phi_rules=rules, deid_recipe_text=recipe_text,
      compression_level=opts.compression_level, entities=entities,
      overwrite=bool(opts.overwrite), full_scan=bool(opts.full_scan),
      bigquery_table=table,
      bigquery_method=opts.bigquery_method, plan=bool(opts.plan),
      on_busy=opts.on_busy, lease_seconds=opts.lease_seconds,
      rules_id=rules_fingerprint(rules, recipe_text, opts.item_id))


def rules_fingerprint(rules: List[str], recipe_text: Optional[str],
                      item_id: str) -> str:
  """What decides each file's outcome, as 16 hex digits."""
  text = json.dumps({"phi_rules": sorted(rules), "deid_recipe": recipe_text,
                     "item_id": item_id, "version": __version__},
                    sort_keys=True)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _read_text(path: str, option: str) -> str:
  try:
    with FileSystems.open(path) as f:
      return f.read().decode("utf-8")
  except Exception as e:  # pylint: disable=broad-except
    raise OptionsError(f"{option} {path!r} cannot be read: {e}") from e
