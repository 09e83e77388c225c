"""Build one metadata row per stored image: its header merged with where its
study object lives. Rows satisfy transforms.schema.TABLE_SCHEMA; a header
value that does not fit its typed column leaves the column NULL and stays,
as written, in `metadata`.
"""

import math
from typing import Any, Dict, Iterable, Optional, Sequence

import apache_beam as beam

from transforms.keys import calendar_date
from transforms.progress import Count
from transforms.records import (HeaderPart, ImageRecord, MemberLocation,
                                StoredStudy)
from transforms.schema import DICOM_COLUMNS, INVALID_VALUES
from transforms.spill import header_parts

_INT64_MAX = (1 << 63) - 1


def _string(v: Any) -> Optional[str]:
  return None if v is None else str(v).strip()


def _integer(v: Any) -> Optional[int]:
  try:
    f = float(v)
  except (TypeError, ValueError):
    return None
  if not math.isfinite(f) or f != int(f) or abs(f) > _INT64_MAX:
    return None
  return int(f)


def _float(v: Any) -> Optional[float]:
  try:
    f = float(v)
  except (TypeError, ValueError):
    return None
  return f if math.isfinite(f) else None


def _date(v: Any) -> Optional[str]:
  """DICOM DA 'YYYYMMDD' -> 'YYYY-MM-DD'; None for anything else."""
  day = calendar_date(v)
  return day.isoformat() if day else None


_CONVERT = {"STRING": _string, "INTEGER": _integer, "FLOAT": _float,
            "DATE": _date}


# (column, converter, repeated) of each typed column, once.
_COLUMN_SOURCES = tuple((keyword, _CONVERT[type_], mode == "REPEATED")
                        for keyword, type_, mode in DICOM_COLUMNS)


def dicom_columns(header: Dict[str, Any], invalid: Sequence[str] = ()
                  ) -> Dict[str, Any]:
  """The typed columns of one header by keyword (header_json.py), and the
  JSONPaths of its values kept as written (`invalid_values`); NULL (None)
  where a value does not fit, or was not readable as its VR says."""
  unreadable = set(invalid)
  row = {}
  for keyword, convert, repeated in _COLUMN_SOURCES:
    value = header.get(keyword)
    if value is None or f"$.{keyword}" in unreadable:
      values = []
    else:
      values = value if isinstance(value, list) else [value]
    if repeated:
      converted = [convert(v) for v in values]
      row[keyword] = [c for c in converted if c is not None]
    else:
      row[keyword] = convert(values[0]) if values else None
  row[INVALID_VALUES] = list(invalid)
  return row


def build_row(collection: str, stored: StoredStudy, image: ImageRecord,
              header: HeaderPart, member: MemberLocation, run_id: str,
              version: str, rules: Optional[str] = None) -> Dict[str, Any]:
  loc = stored.location
  row = {
      "collection": collection,
      "entity_id": stored.study.entity_id,
      "item_id": stored.study.item_id,
      "study_instance_uid": image.study_instance_uid,
      "series_instance_uid": image.series_instance_uid or None,
      "sop_instance_uid": image.sop_instance_uid,
      "source_path": image.source.relpath,
      "TransferSyntaxUID": image.transfer_syntax_uid,
  }
  row.update(header.columns)
  row["metadata"] = header.metadata_text   # JSON text (sinks.row_line)
  row["storage"] = {
      "uri": loc.uri, "bucket": loc.bucket, "object": loc.object_name,
      "member": member.member, "member_offset": member.member_offset,
      "member_length": member.member_length,
      "member_sha256": member.sha256,
      "member_size_bytes": member.size_bytes,
      "size_bytes": loc.size_bytes, "md5_hash": loc.md5_hash,
      "crc32c": loc.crc32c, "generation": loc.generation,
      "download_link": loc.download_link, "metadata_link": loc.metadata_link,
      "written_at": loc.written_at,
  }
  row["source_version"] = image.source.version or None
  row["rules"] = rules
  row["run_id"] = run_id
  row["pipeline_version"] = version
  return row


# Rows are built this many images at a time: their headers are read back
# together, and only they are held at once.
ROWS_CHUNK = 256


class _BuildRows(beam.DoFn):
  def __init__(self, collection: str, run_id: str, version: str,
               rules: Optional[str] = None):
    self.collection = collection
    self.run_id = run_id
    self.version = version
    self.rules = rules
    self.rows = Count("rows_built")

  def process(self, stored: StoredStudy) -> Iterable[Dict[str, Any]]:
    images = stored.study.images
    for start in range(0, len(images), ROWS_CHUNK):
      end = start + ROWS_CHUNK
      for image, header, member in zip(images[start:end],
                                       header_parts(images[start:end]),
                                       stored.members[start:end]):
        self.rows.inc()
        yield build_row(self.collection, stored, image, header, member,
                        self.run_id, self.version, self.rules)


class BuildRows(beam.PTransform):
  """StoredStudy -> one row dict per image. rules: the run's rules
  fingerprint, recorded with each image's listing facts."""

  def __init__(self, collection: str, run_id: str, version: str,
               rules: Optional[str] = None):
    super().__init__()
    self.collection = collection
    self.run_id = run_id
    self.version = version
    self.rules = rules

  def expand(self, stored):
    return stored | "BuildRows" >> beam.ParDo(
        _BuildRows(self.collection, self.run_id, self.version, self.rules))
