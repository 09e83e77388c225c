"""The one row schema, in BigQuery's JSON schema form, and a row checker.

Typed DICOM columns are named by their DICOM keyword, as the Cloud Healthcare
API's BigQuery export names them; the whole header is kept in `metadata`,
BigQuery's JSON type, keyed by keyword (transforms/header_json.py).
Columns may be added later, never renamed.
"""

import datetime
import json
import math
import re
from typing import Any, Dict, List, Tuple

# (DICOM keyword, BigQuery type, mode) of the typed, searchable columns.
DICOM_COLUMNS: Tuple[Tuple[str, str, str], ...] = (
    ("Modality", "STRING", "NULLABLE"),
    ("SOPClassUID", "STRING", "NULLABLE"),
    ("StudyDate", "DATE", "NULLABLE"),
    ("StudyTime", "STRING", "NULLABLE"),
    ("SeriesDate", "DATE", "NULLABLE"),
    ("ContentDate", "DATE", "NULLABLE"),
    ("AccessionNumber", "STRING", "NULLABLE"),
    ("StudyID", "STRING", "NULLABLE"),
    ("StudyDescription", "STRING", "NULLABLE"),
    ("SeriesDescription", "STRING", "NULLABLE"),
    ("SeriesNumber", "INTEGER", "NULLABLE"),
    ("InstanceNumber", "INTEGER", "NULLABLE"),
    ("BodyPartExamined", "STRING", "NULLABLE"),
    ("PatientID", "STRING", "NULLABLE"),
    ("PatientSex", "STRING", "NULLABLE"),
    ("PatientAge", "STRING", "NULLABLE"),
    ("Manufacturer", "STRING", "NULLABLE"),
    ("ManufacturerModelName", "STRING", "NULLABLE"),
    ("ImageType", "STRING", "REPEATED"),
    ("PhotometricInterpretation", "STRING", "NULLABLE"),
    ("Rows", "INTEGER", "NULLABLE"),
    ("Columns", "INTEGER", "NULLABLE"),
    ("NumberOfFrames", "INTEGER", "NULLABLE"),
    ("BitsAllocated", "INTEGER", "NULLABLE"),
    ("SliceThickness", "FLOAT", "NULLABLE"),
    ("PixelSpacing", "FLOAT", "REPEATED"),
    ("BurnedInAnnotation", "STRING", "NULLABLE"),
)


METADATA = "metadata"
# Local row lines end with the metadata object, after this (sinks.row_line),
# so that readers which do not need it cut it off unparsed (current.py).
METADATA_LAST = f', "{METADATA}": '
INVALID_VALUES = "invalid_values"
# Local rows: DIR/rows-<run id>-*.json (newline-delimited), DIR/schema.json.
ROWS_PREFIX = "rows-"
SCHEMA_FILE = "schema.json"


def row_files(metadata_dir: str) -> List[str]:
  """Every run's row files in a metadata folder, sorted."""
  from transforms.files import matching
  return matching(metadata_dir.rstrip("/") + "/" + ROWS_PREFIX + "*.json")


def _field(name, type_, mode="NULLABLE", description=None, fields=None):
  f = {"name": name, "type": type_, "mode": mode}
  if description:
    f["description"] = description
  if fields:
    f["fields"] = fields
  return f


STORAGE_FIELDS = [
    _field("uri", "STRING", "REQUIRED", "gs:// URI (or path) of the study object"),
    _field("bucket", "STRING", "REQUIRED"),
    _field("object", "STRING", "REQUIRED", "object key in the bucket"),
    _field("member", "STRING", "REQUIRED", "path of this image inside the tar"),
    _field("member_offset", "INTEGER", "REQUIRED",
           "byte offset of this image's gzip member in the object"),
    _field("member_length", "INTEGER", "REQUIRED",
           "byte length of this image's gzip member"),
    _field("member_sha256", "STRING", "REQUIRED",
           "hex SHA-256 of the original DICOM file"),
    _field("member_size_bytes", "INTEGER", "REQUIRED",
           "size of the original DICOM file"),
    _field("size_bytes", "INTEGER", "REQUIRED", "size of the study object"),
    _field("md5_hash", "STRING", "REQUIRED", "base64 MD5 of the study object"),
    _field("crc32c", "STRING", "REQUIRED", "base64 CRC32C of the study object"),
    _field("generation", "INTEGER", "NULLABLE", "Cloud Storage generation"),
    _field("download_link", "STRING", "NULLABLE", "Cloud Storage mediaLink"),
    _field("metadata_link", "STRING", "NULLABLE", "Cloud Storage selfLink"),
    _field("written_at", "TIMESTAMP", "REQUIRED"),
]

TABLE_SCHEMA: Dict[str, List[Dict[str, Any]]] = {"fields": [
    _field("collection", "STRING", "REQUIRED"),
    _field("entity_id", "STRING", "REQUIRED"),
    _field("item_id", "STRING", "REQUIRED"),
    _field("study_instance_uid", "STRING", "REQUIRED"),
    _field("series_instance_uid", "STRING", "NULLABLE"),
    _field("sop_instance_uid", "STRING", "REQUIRED"),
    _field("source_path", "STRING", "REQUIRED",
           "path of the input file below its entity folder"),
    _field("TransferSyntaxUID", "STRING", "NULLABLE"),
    *[_field(k, t, m) for k, t, m in DICOM_COLUMNS],
    _field(METADATA, "JSON", "REQUIRED",
           "full header by DICOM keyword (private and unknown tags by "
           "GGGGEEEE), nested sequences included, bulk data left out"),
    _field(INVALID_VALUES, "STRING", "REPEATED",
           "JSONPath in metadata of each value kept as written because it "
           "cannot be read as its VR says (e.g. a DS that is not a number)"),
    _field("storage", "RECORD", "REQUIRED", fields=STORAGE_FIELDS),
    _field("source_version", "STRING", "NULLABLE",
           "the input file's listing version when it was stored: "
           "mtime_ns:<n> (local) or generation:<n> (Cloud Storage)"),
    _field("rules", "STRING", "NULLABLE",
           "fingerprint of the rules the run applied (PHI rules, deid "
           "recipe, item id keyword, pipeline version)"),
    _field("run_id", "STRING", "REQUIRED"),
    _field("pipeline_version", "STRING", "REQUIRED"),
]}


def schema_json() -> str:
  """schema.json as `bq load --schema` takes it: the list of fields."""
  return json.dumps(TABLE_SCHEMA["fields"], indent=2)


_INT64 = (-(1 << 63), (1 << 63) - 1)
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _scalar_error(type_: str, value: Any) -> str:
  if type_ == "STRING":
    return "" if isinstance(value, str) else "is not a string"
  if type_ == "INTEGER":
    ok = (isinstance(value, int) and not isinstance(value, bool)
          and _INT64[0] <= value <= _INT64[1])
    return "" if ok else "is not a 64-bit integer"
  if type_ == "FLOAT":
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))
    return "" if ok else "is not a finite number"
  if type_ == "DATE":
    if isinstance(value, str) and _DATE.match(value):
      try:
        datetime.date.fromisoformat(value)
        return ""
      except ValueError:
        pass
    return "is not a DATE (YYYY-MM-DD)"
  if type_ == "JSON":
    # JSON text (as rows carry it) or the value itself (as loads take it).
    return "" if isinstance(value, (str, dict, list)) else "is not JSON"
  if type_ == "TIMESTAMP":
    try:
      datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
      return ""
    except ValueError:
      return "is not a TIMESTAMP"
  return f"has unknown type {type_}"


# BigQuery's streaming insert takes rows up to 10 MB; keep a margin.
MAX_ROW_BYTES = 9 * 1024 * 1024


def row_size_bytes(row: Dict[str, Any]) -> int:
  """The row's size as JSON, exact when it could be near MAX_ROW_BYTES.
  Serializing every row costs ~0.1 ms; a row is far below the limit when
  even six bytes per character of its text (JSON's longest escape) and
  64 KiB for everything else would fit, and then its text length is
  returned instead."""
  text_chars = sum(len(v) for v in row.values() if isinstance(v, str))
  if 6 * text_chars + 65536 < MAX_ROW_BYTES and _small_non_text(row):
    return text_chars
  return len(json.dumps(row, default=str).encode("utf-8"))


def size_errors(row: Dict[str, Any]) -> List[str]:
  """The row's size, if more than a streaming insert takes."""
  size = row_size_bytes(row)
  return ([f"row is {size} bytes (at most {MAX_ROW_BYTES})"]
          if size > MAX_ROW_BYTES else [])


def _small_non_text(row: Dict[str, Any]) -> bool:
  """Everything but the row's top-level strings is at most 64 KiB as JSON
  (records and repeated columns of a few short values, in practice)."""
  rest = {k: v for k, v in row.items() if not isinstance(v, str)}
  return len(json.dumps(rest, default=str)) <= 65536 - 1024


def row_errors(row: Dict[str, Any], fields=None, prefix: str = "") -> List[str]:
  """Every way the row does not fit the schema; empty when it fits."""
  errors = []
  if fields is None:
    fields = TABLE_SCHEMA["fields"]
    errors += size_errors(row)
  known, compiled = _compiled(fields)
  errors += [f"{prefix}{k}: not in the schema" for k in row if k not in known]
  for key, mode, type_, subfields in compiled:
    value = row.get(key)
    if value is None:
      if mode == "REQUIRED":
        errors.append(f"{prefix}{key}: required but missing")
      continue
    if mode == "REPEATED":
      if not isinstance(value, list):
        errors.append(f"{prefix}{key}: repeated field is not a list")
        continue
      values = value
    elif _fits_at_a_glance(type_, value):   # most of a row's ~50 values
      continue
    else:
      values = (value,)
    for v in values:
      if type_ == "RECORD":
        if not isinstance(v, dict):
          errors.append(f"{prefix}{key}: is not a record")
        else:
          errors += row_errors(v, subfields, f"{prefix}{key}.")
      else:
        problem = _scalar_error(type_, v)
        if problem:
          errors.append(f"{prefix}{key}: {v!r:.80} {problem}")
  return errors


def _fits_at_a_glance(type_: str, value: Any) -> bool:
  """True when _scalar_error would find nothing, by its value's exact type;
  False when it must look (a subclass, a string to parse, a record)."""
  kind = value.__class__
  if type_ == "STRING" or type_ == "JSON":
    return kind is str
  if type_ == "INTEGER":
    return kind is int and _INT64[0] <= value <= _INT64[1]
  if type_ == "FLOAT":
    return kind is float and math.isfinite(value)
  return False


# The schema's fields as tuples, made once per list of fields: a row is
# checked against ~50 of them, and reading each field's dict cost more
# than the checks. Keyed by the list's id, with the list kept alive beside.
_compiled_fields: Dict[int, tuple] = {}


def _compiled(fields) -> Tuple[frozenset, Tuple[tuple, ...]]:
  entry = _compiled_fields.get(id(fields))
  if entry is None or entry[0] is not fields:
    entry = _compiled_fields[id(fields)] = (
        fields, frozenset(f["name"] for f in fields),
        tuple((f["name"], f.get("mode", "NULLABLE"), f["type"], f.get("fields"))
              for f in fields))
  return entry[1], entry[2]
