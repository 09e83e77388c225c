"""What is already stored: the current rows of every study, from the
BigQuery view or from earlier runs' local row files.

The archive writer compares them with each study's manifest to decide
cheaply whether the study is already stored (skip it), stored but missing
rows (write its rows only), or new or changed (write it).
"""

import json
from typing import Dict, Iterable, List, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from transforms.keys import join_uri
from transforms.records import rfc3339_utc
from transforms.sinks import ROWS_PREFIX   # the files WriteRowsLocal writes

# A current image is the tuple (sop_instance_uid, member_sha256,
# member_offset, md5_hash, size_bytes, written_at) of one current row.


def current_image(row: dict) -> Tuple[Tuple[str, str], tuple]:
  st = row["storage"]
  return ((row["entity_id"], row["study_instance_uid"]),
          (row["sop_instance_uid"], st["member_sha256"], st["member_offset"],
           st["md5_hash"], st["size_bytes"], st["written_at"]))


def newest_per_study(keyed: Iterable[Tuple[Tuple[str, str], tuple]]
                     ) -> Dict[Tuple[str, str], List[tuple]]:
  """The rows of each study's newest object, one per image: the same rule
  as the BigQuery view, for local row files."""
  newest: Dict[Tuple[str, str], Dict[str, tuple]] = {}
  for key, image in keyed:
    images = newest.setdefault(key, {})
    if images:
      version = next(iter(images.values()))[5]
      if image[5] < version:
        continue
      if image[5] > version:
        images.clear()
    images[image[0]] = image
  return {k: sorted(v.values()) for k, v in newest.items()}


def row_files(metadata_dir: str) -> List[str]:
  pattern = join_uri(metadata_dir, ROWS_PREFIX + "*.json")
  return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def _rows_in(path: str) -> Iterable[dict]:
  with FileSystems.open(path) as f:
    for line in f:
      if line.strip():
        yield json.loads(line)


class _ReadLocalCurrent(beam.DoFn):
  def process(self, metadata_dir: str):
    keyed = (current_image(row) for path in row_files(metadata_dir)
             for row in _rows_in(path))
    for key, images in newest_per_study(keyed).items():
      for image in images:
        yield key, image


class _ReadBigQueryCurrent(beam.DoFn):
  def __init__(self, table: str):
    self.table = table

  def process(self, _):
    from transforms.bigquery import CURRENT_VIEW_SUFFIX, query_rows, sql_table
    sql = f"""
        SELECT entity_id, study_instance_uid, sop_instance_uid,
               storage.member_sha256 AS member_sha256,
               storage.member_offset AS member_offset,
               storage.md5_hash AS md5_hash, storage.size_bytes AS size_bytes,
               storage.written_at AS written_at
        FROM {sql_table(self.table, CURRENT_VIEW_SUFFIX)}"""
    for r in query_rows(self.table, sql, {}):
      written = r["written_at"]
      written = (rfc3339_utc(written) if hasattr(written, "isoformat")
                 else str(written))
      yield ((r["entity_id"], r["study_instance_uid"]),
             (r["sop_instance_uid"], r["member_sha256"], r["member_offset"],
              r["md5_hash"], r["size_bytes"], written))


class ReadCurrentRows(beam.PTransform):
  """-> ((entity_id, study_instance_uid), current image tuple) per row.

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
      return pbegin | "Nothing" >> beam.Create([])
    if self.table:
      read = beam.ParDo(_ReadBigQueryCurrent(self.table))
    else:
      read = beam.ParDo(_ReadLocalCurrent())
    return (pbegin
            | "Source" >> beam.Create([self.metadata_dir or ""])
            | "Read" >> read
            | "Spread" >> beam.Reshuffle())
