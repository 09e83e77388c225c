"""The pipeline's own options, with defaults from the original system's
environment variables, and the checks that run before any work."""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import List, Optional

from apache_beam.options.pipeline_options import PipelineOptions

from transforms import discover, phi, studies
from transforms.archive import DEFAULT_COMPRESSION_LEVEL
from transforms.keys import UnsafeKeyComponent, check_collection, join_uri


class OptionsError(ValueError):
  """A bad option: reported as one line naming it, before any work."""


def _env_bucket() -> Optional[str]:
  # The original config named a bare bucket ('som-pacs'); that means gs://.
  value = os.environ.get("GOOGLE_CLOUD_STORAGE")
  if value and "://" not in value and not value.startswith("/"):
    return "gs://" + value
  return value


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
        "--bucket", default=_env_bucket(),
        help="Destination for study objects: gs://BUCKET or a local folder. "
             "Default: $GOOGLE_CLOUD_STORAGE (a bare name means gs://NAME).")
    parser.add_argument(
        "--collection", default=os.environ.get("GOOGLE_STORAGE_COLLECTION"),
        help="Collection (e.g. IRB number): letters, digits, underscores. "
             "Names the key prefix and the BigQuery dataset. "
             "Default: $GOOGLE_STORAGE_COLLECTION.")
    parser.add_argument(
        "--metadata_output",
        help="Folder for the rows as newline-delimited JSON (rows.json) "
             "with schema.json, for `bq load`.")
    parser.add_argument(
        "--dead_letter",
        help="Folder for rows that could not be written, as newline-"
             "delimited JSON with the error. Default: "
             "<metadata_output>/dead_letter.")
    parser.add_argument(
        "--report",
        help="Path of the JSON run report. Default: "
             "<metadata_output>/report.json, else a temporary file.")
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
        help="gzip (ISA-L) level 0-3 for study objects. Default: 2.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Checked, resolved settings of one run."""
  input_roots: List[str]
  bucket: str
  collection: str
  metadata_output: Optional[str]
  dead_letter: str
  report: str
  item_id: str
  phi_rules: List[str]
  deid_recipe_text: Optional[str]
  compression_level: int


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
  if not opts.metadata_output:
    raise OptionsError("--metadata_output is required: where rows go")
  try:
    roots = [_absolute(r) for r in discover.split_input_roots(opts.input)]
    rules = [r.strip() for r in opts.phi_rules.split(",") if r.strip()]
    phi.check_rule_names(rules)
    studies.keyword_tag(opts.item_id)
  except ValueError as e:
    raise OptionsError(str(e)) from e
  if not 0 <= opts.compression_level <= 3:
    raise OptionsError("--compression_level must be 0, 1, 2 or 3")
  recipe_text = None
  if opts.deid_recipe:
    if "deid" not in rules:
      raise OptionsError("--deid_recipe needs 'deid' in --phi_rules")
    try:
      with open(opts.deid_recipe, encoding="utf-8") as f:
        recipe_text = f.read()
    except OSError as e:
      raise OptionsError(f"--deid_recipe cannot be read: {e}") from e
  metadata_output = _absolute(opts.metadata_output)
  report = _absolute(opts.report) or (
      join_uri(metadata_output, "report.json") if metadata_output else
      os.path.join(tempfile.gettempdir(), f"dicom-storage-report-{run_id}.json"))
  return RunConfig(
      input_roots=roots, bucket=_absolute(opts.bucket).rstrip("/"),
      collection=opts.collection, metadata_output=metadata_output,
      dead_letter=_absolute(opts.dead_letter) or join_uri(
          metadata_output, "dead_letter"),
      report=report, item_id=opts.item_id, phi_rules=rules,
      deid_recipe_text=recipe_text,
      compression_level=opts.compression_level)
