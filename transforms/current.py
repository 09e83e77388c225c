"""What is already stored: the current rows of every study, from the
BigQuery view or from earlier runs' local row files.

The archive writer compares them with each study's manifest to decide
cheaply whether the study is already stored (skip it), stored but missing
rows (write its rows only), or new or changed (write it).
"""

from typing import (Dict, Iterable, Iterator, List, NamedTuple, Optional,
                    Tuple)

import apache_beam as beam
import orjson

from transforms.once import Once
from transforms.records import rfc3339_utc
from transforms.files import open_binary
from transforms.schema import METADATA_LAST, row_files

class CurrentRow(NamedTuple):
  """What later steps need of one current row. Its first six fields are
  the archive writer's current image: (sop_instance_uid, member_sha256,
  member_offset, md5_hash, size_bytes, written_at)."""
  sop_instance_uid: str
  member_sha256: str
  member_offset: int
  md5_hash: str
  size_bytes: int          # of the object
  written_at: str
  entity_id: str
  study_instance_uid: str
  source_path: str         # below the entity folder
  member_size_bytes: int   # of the input file
  source_version: Optional[str]   # the input file's listing version
  rules: Optional[str]            # the run's rules fingerprint
  uri: str
  member: str
  modality: Optional[str]

  @property
  def study_key(self) -> Tuple[str, str]:
    return self.entity_id, self.study_instance_uid

  @property
  def image(self) -> tuple:
    return tuple(self[:6])


def current_row(row: dict) -> CurrentRow:
  st = row["storage"]
  return CurrentRow(
      row["sop_instance_uid"], st["member_sha256"], st["member_offset"],
      st["md5_hash"], st["size_bytes"], st["written_at"], row["entity_id"],
      row["study_instance_uid"], row["source_path"], st["member_size_bytes"],
      row.get("source_version"), row.get("rules"), st["uri"], st["member"],
      row.get("Modality"))


def newest_per_study(rows: Iterable[CurrentRow]
                     ) -> Dict[Tuple[str, str], List[CurrentRow]]:
  """The rows of each study's newest object, one per image: the same rule
  as the BigQuery view, for local row files."""
  newest: Dict[Tuple[str, str], Dict[str, CurrentRow]] = {}
  for row in rows:
    images = newest.setdefault(row.study_key, {})
    if images:
      version = next(iter(images.values())).written_at
      if row.written_at < version:
        continue
      if row.written_at > version:
        images.clear()
    images[row.sop_instance_uid] = row
  return {k: sorted(v.values()) for k, v in newest.items()}


_METADATA_AT_END = METADATA_LAST.encode()


def _rows_in(path: str) -> Iterable[dict]:
  """The rows of one file, without their metadata: sinks.row_line writes it
  last, so the rest of the line parses alone, at a fraction of the cost."""
  with open_binary(path) as f:
    for line in f:
      if not line.strip():
        continue
      cut = line.find(_METADATA_AT_END)
      nested = cut > 0 and line[cut + len(_METADATA_AT_END):][:1] == b"{"
      yield orjson.loads(line[:cut] + b"}" if nested else line)


def read_local_current(metadata_dir: str) -> Iterator[CurrentRow]:
  """The current rows of earlier runs' row files in a metadata folder."""
  rows = (current_row(r) for path in row_files(metadata_dir)
          for r in _rows_in(path))
  for study_rows in newest_per_study(rows).values():
    yield from study_rows


def read_bigquery_current(table: str) -> Iterator[CurrentRow]:
  """The rows of a table's current view."""
  from transforms.bigquery import CURRENT_VIEW_SUFFIX, query_rows, sql_table
  sql = f"""
        SELECT sop_instance_uid, storage.member_sha256 AS member_sha256,
               storage.member_offset AS member_offset,
               storage.md5_hash AS md5_hash, storage.size_bytes AS size_bytes,
               storage.written_at AS written_at, entity_id,
               study_instance_uid, source_path,
               storage.member_size_bytes AS member_size_bytes,
               source_version, rules, storage.uri AS uri,
               storage.member AS member, Modality AS modality
        FROM {sql_table(table, CURRENT_VIEW_SUFFIX)}"""
  for r in query_rows(table, sql, {}):
    written = r["written_at"]
    r["written_at"] = (rfc3339_utc(written) if hasattr(written, "isoformat")
                       else str(written))
    yield CurrentRow(**r)


def current_rows(table: Optional[str], metadata_dir: Optional[str]
                 ) -> Iterator[CurrentRow]:
  """From the BigQuery current view when a table is named, else from the
  row files of earlier runs in the metadata folder."""
  if table:
    return read_bigquery_current(table)
  return read_local_current(metadata_dir or "")


class _ReadCurrent(beam.DoFn):
  def __init__(self, table: Optional[str]):
    self.table = table

  def process(self, metadata_dir: str) -> Iterable[CurrentRow]:
    yield from current_rows(self.table, metadata_dir)


class ReadCurrentRows(beam.PTransform):
  """-> CurrentRow per current row.

  From the BigQuery current view when a table is named, else from the row
  files of earlier runs in the metadata folder; nothing with --overwrite.
  """

  def __init__(self, table: Optional[str], metadata_dir: Optional[str],
               overwrite: bool = False):
    super().__init__()
    self.table = table
    self.metadata_dir = metadata_dir
    self.overwrite = overwrite

  def expand(self, pbegin):
    if self.overwrite:
      return pbegin | "Nothing" >> Once([])
    return (pbegin
            | "Source" >> Once([self.metadata_dir or ""])
            | "Read" >> beam.ParDo(_ReadCurrent(self.table))
            | "Spread" >> beam.Reshuffle())


def by_study(row: CurrentRow) -> Tuple[Tuple[str, str], tuple]:
  """What GroupStudies takes: ((entity, study uid), current image)."""
  return row.study_key, row.image
