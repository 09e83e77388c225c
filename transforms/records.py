"""The small typed values that flow between transforms.

Nothing here carries pixel data: only paths, identifiers and header metadata
go through a GroupByKey. The archive writer reads image bytes itself.
"""

import dataclasses
import datetime
import json
from typing import Optional, Sequence, Tuple, Union

from isal import isal_zlib

# Outcome of one input file in the run report.
FLAGGED = "flagged"    # PHI rule matched: never written anywhere
REJECTED = "rejected"  # bad input: not DICOM, missing UIDs, unsafe names ...
FAILED = "failed"      # good input that could not be stored (I/O error ...)


def pack_text(text: str, deflated: bool = True) -> bytes:
  """A header's JSON text as bytes: deflated where it crosses a shuffle
  (Dataflow), plain where a local run sets it aside on its own disk (it was
  ~10% of reading a small image's header there)."""
  data = text.encode("utf-8")
  return isal_zlib.compress(data, 1) if deflated else data


def unpack_text(packed: bytes) -> str:
  # The text is a JSON object: '{' never starts a zlib stream (0x78 ...).
  if packed[:1] == b"{":
    return packed.decode("utf-8")
  return isal_zlib.decompress(packed).decode("utf-8")


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """One file found under an entity folder."""
  path: str          # as FileSystems names it (local path or gs:// URI)
  entity_id: str     # name of the entity folder directly under the input root
  relpath: str       # posix path below the entity folder
  size_bytes: int
  # What says the file is unchanged since listed before, with its size:
  # 'mtime_ns:<n>' on a local disk, 'generation:<n>' on Cloud Storage.
  version: str = ""


@dataclasses.dataclass(frozen=True)
class Excluded:
  """An input file that was not stored, and why."""
  path: str
  entity_id: str
  status: str        # FLAGGED, REJECTED or FAILED
  reason: str
  # The run whose outcome this is, when the file was not read again
  # (unchanged since: transforms/shortcut.py).
  not_reread_since: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class HeaderPart:
  """What a row takes from an image's header, beyond its identifiers."""
  # The typed DICOM columns of the row (schema.py) and its invalid_values,
  # as JSON text: one short string decodes to ~0.7 kB where a dict of ~30
  # values took ~3.7 kB.
  columns_json: str
  # The header by keyword (header_json.py), no bulk data: the row's
  # metadata, as text by pack_text (deflated: fewer bytes to carry).
  header_packed: bytes

  @property
  def metadata_text(self) -> str:
    return unpack_text(self.header_packed)

  @property
  def columns(self) -> dict:
    return json.loads(self.columns_json)


@dataclasses.dataclass(frozen=True)
class SpilledHeader:
  """Where transforms/spill.py set an image's HeaderPart aside: bytes
  [offset, offset + length) of one file (spill.py reads spilled records by
  the same kind of span)."""
  path: str
  offset: int
  length: int


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """A readable DICOM image: identifiers, the few values later steps use,
  and its header for the row: in the record as read; a local run sets it
  aside (transforms/spill.py) before images are grouped into studies, so
  that a study's records stay small however many images it has."""
  source: SourceFile
  study_instance_uid: str
  series_instance_uid: str
  sop_instance_uid: str
  header: Union[HeaderPart, SpilledHeader]
  study_date: Optional[str] = None           # typed StudyDate, YYYY-MM-DD
  transfer_syntax_uid: Optional[str] = None
  item_value: Optional[str] = None           # value of the --item_id keyword
  burned_in_annotation: Optional[str] = None  # as written, even if invalid
  modality: Optional[str] = None              # for the report's counts


@dataclasses.dataclass(frozen=True)
class Study:
  """The kept images of one study, with the object they go to."""
  entity_id: str
  study_instance_uid: str
  study_date: str            # YYYYMMDD, or the placeholder
  item_id: str
  object_key: str            # Collection/<c>/Entity/<e>/<e>_<date>_<item>.tar.gz
  # Sorted by member name, unique SOPs: a tuple, or in a local run the
  # images by reference (transforms/spill.py SpilledImages).
  images: Sequence[ImageRecord]
  # Its current rows before this run (transforms/current.py tuples): what
  # the archive writer compares with the stored object's manifest.
  current: Tuple[tuple, ...] = ()
  # Its images' input bytes: how large it is, known without reading its
  # images back.
  input_bytes: int = 0

  @property
  def archive_root(self) -> str:
    """Top folder inside the tar: the object's base name."""
    return self.object_key.rsplit("/", 1)[-1][:-len(".tar.gz")]

  def member_name(self, image: ImageRecord) -> str:
    return f"{self.archive_root}/{image.source.relpath}"


def rfc3339_utc(moment: datetime.datetime) -> str:
  """'2026-11-27T23:07:55.123456Z': how written_at is always spelled, so
  times from the file system, Cloud Storage and BigQuery compare as text."""
  if moment.tzinfo is None:   # naive: already UTC
    moment = moment.replace(tzinfo=datetime.timezone.utc)
  return moment.astimezone(datetime.timezone.utc).isoformat(
      timespec="microseconds").replace("+00:00", "Z")


def duration(seconds: float, tenths_below_a_minute: bool = False) -> str:
  """'m:ss', or 'h:mm:ss' from an hour on; '4.2 s' under a minute when
  asked (a time taken, where a progress line wants a clock)."""
  if tenths_below_a_minute and seconds < 60:
    return f"{seconds:.1f} s"
  seconds = int(seconds)
  return (f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
          if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}")


@dataclasses.dataclass(frozen=True)
class ObjectLocation:
  """Where a study object lives, as the storage system reports it."""
  uri: str
  bucket: str
  object_name: str
  size_bytes: int
  md5_hash: str              # base64, as Cloud Storage reports md5Hash
  crc32c: str                # base64 of the big-endian CRC32C
  written_at: str            # RFC 3339 UTC
  generation: Optional[int] = None
  download_link: Optional[str] = None   # Cloud Storage mediaLink
  metadata_link: Optional[str] = None   # Cloud Storage selfLink


@dataclasses.dataclass(frozen=True)
class MemberLocation:
  """One image inside a study object: its own gzip member."""
  sop_instance_uid: str
  member: str                # path inside the tar
  size_bytes: int            # of the original DICOM file
  sha256: str                # hex, of the original DICOM file
  member_offset: int         # byte offset of its gzip member in the object
  member_length: int         # byte length of that gzip member


@dataclasses.dataclass(frozen=True)
class StoredStudy:
  """A study whose object is stored: the input to row building."""
  study: Study
  location: ObjectLocation
  members: Tuple[MemberLocation, ...]   # same order as study.images
  # The object was already stored, by a run that ended before its rows:
  # only its rows are written now.
  rows_completed: bool = False


# What a study needs, decided from its stored object and its current rows.
WRITE = "write"                   # new or changed: write object and rows
COMPLETE_ROWS = "complete rows"   # object stored, rows missing: write rows
SKIP = "skip"                     # stored with current rows: nothing


@dataclasses.dataclass(frozen=True)
class PlannedStudy:
  """What a --plan run decided for a study; nothing is written."""
  study: Study
  uri: str          # where its object is, or would be
  action: str       # WRITE, COMPLETE_ROWS or SKIP


@dataclasses.dataclass(frozen=True)
class RecordedStudy:
  """A study of an entity whose files are all unchanged since they were
  stored: skipped without reading them, as its current rows record it."""
  entity_id: str
  study_instance_uid: str
  uri: str
  size_bytes: int            # of its object
  md5_hash: str
  # (input path, member, SOP instance UID, modality, input size) per image
  files: Tuple[Tuple[str, str, str, Optional[str], int], ...]
