"""Read DICOM headers: parse up to the pixel data, export the header as
JSON by keyword (transforms/header_json.py) and keep the few values later
steps use.
"""

import json
import re
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import apache_beam as beam
import pydicom
import pydicom.config
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from transforms.header_json import HeaderExport, export_header
from transforms.part10 import read_part10_header
from transforms.progress import Count
from transforms.records import (REJECTED, Excluded, HeaderPart, ImageRecord,
                                SourceFile, pack_text)
from transforms.rows import dicom_columns

EXCLUDED_TAG = "excluded"


# Header parsing stops at the pixel data: on gs:// read in small ranges, so
# that parsing a header does not download the whole file (Beam's default
# buffer is 16 MiB) and each input byte crosses the network about once.
HEADER_READ_BUFFER = 64 * 1024


def open_source(path: str, gcsio=None):
  """Opens an input file as raw bytes (never auto-decompressed by suffix).

  With a GcsIO client, gs:// files are read in HEADER_READ_BUFFER ranges.
  """
  if gcsio is not None and path.startswith("gs://"):
    return gcsio.open(path, "rb", read_buffer_size=HEADER_READ_BUFFER)
  return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def first_value(header: Dict[str, Any], key: str) -> Optional[Any]:
  """The first value of a top-level element of a header by keyword, or
  None."""
  value = header.get(key)
  if isinstance(value, list):
    return value[0] if value else None
  return value


_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _parse(fileobj) -> Tuple[Callable[[], HeaderExport], Optional[str], bool]:
  """(a function that exports the header, its transfer syntax UID, whether
  the file is Part 10) of the file fileobj is at the start of. Raises
  ValueError with a reason.

  Most files are read from their first HEADER_READ_BUFFER bytes by
  transforms/part10.py; the rest by pydicom's general reader. A dataset
  written without the 128-byte preamble and 'DICM' prefix is still read
  (pydicom's force=True), but kept only if it then has real UIDs: forced
  reading of a text or image file yields no UIDs and is rejected.
  """
  header = read_part10_header(fileobj, HEADER_READ_BUFFER)
  if header is not None:
    return header.export, header.transfer_syntax_uid, True
  try:
    return _with_syntax(pydicom.dcmread(fileobj, stop_before_pixels=True),
                        True)
  except InvalidDicomError as e:
    not_dicom = e
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"DICOM header cannot be parsed: "
                     f"{type(e).__name__}: {e}") from e
  fileobj.seek(0)
  try:
    return _with_syntax(pydicom.dcmread(fileobj, stop_before_pixels=True,
                                        force=True), False)
  except Exception:  # pylint: disable=broad-except
    raise ValueError(f"not a DICOM file: {not_dicom}") from not_dicom


def _with_syntax(ds: Dataset, part10: bool
                 ) -> Tuple[Callable[[], HeaderExport], Optional[str], bool]:
  meta = getattr(ds, "file_meta", None)
  syntax = meta.get("TransferSyntaxUID") if meta is not None else None
  return lambda: export_header(ds), str(syntax) if syntax else None, part10


def check_keyword(keyword: str) -> str:
  """The keyword, if it is a DICOM keyword (a header's key); else
  ValueError."""
  if tag_for_keyword(keyword) is None:
    raise ValueError(f"{keyword!r} is not a DICOM keyword")
  return keyword


def _text(value: Any) -> Optional[str]:
  text = None if value is None else str(value).strip()
  return text or None


def image_record(source: SourceFile, exported: HeaderExport,
                 transfer_syntax_uid: Optional[str] = None,
                 item_keyword: str = "AccessionNumber",
                 uids_must_look_valid: bool = False,
                 deflate_header: bool = True) -> ImageRecord:
  """An ImageRecord from a header exported by keyword. Raises ValueError
  when a UID the pipeline needs is missing."""
  header = exported.header
  uids = {}
  for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
    value = _text(first_value(header, name)) or ""
    if not value and name != "SeriesInstanceUID":
      raise ValueError("not a DICOM file: no 'DICM' preamble, and no UIDs "
                       "when read without one" if uids_must_look_valid
                       else f"header lacks {name}")
    if uids_must_look_valid and value and not _UID.match(value):
      raise ValueError(f"not a DICOM file: no 'DICM' preamble, and {name} "
                       f"{value!r:.40} is not a UID")
    uids[name] = value
  columns = dicom_columns(header, exported.invalid)
  return ImageRecord(
      source=source,
      study_instance_uid=uids["StudyInstanceUID"],
      series_instance_uid=uids["SeriesInstanceUID"],
      sop_instance_uid=uids["SOPInstanceUID"],
      header=HeaderPart(
          columns_json=json.dumps(columns, separators=(",", ":")),
          header_packed=pack_text(exported.text, deflate_header)),
      study_date=columns.get("StudyDate"),
      transfer_syntax_uid=transfer_syntax_uid,
      item_value=_text(first_value(header, item_keyword)),
      burned_in_annotation=_text(first_value(header, "BurnedInAnnotation")),
      modality=columns.get("Modality"))


def read_image_record(source: SourceFile, fileobj,
                      item_keyword: str = "AccessionNumber",
                      deflate_header: bool = True) -> ImageRecord:
  """Parses one file's header. Raises ValueError with a reason on bad input."""
  if source.size_bytes == 0:
    raise ValueError("empty file (0 bytes)")
  export, syntax, part10 = _parse(fileobj)
  try:
    exported = export()
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"DICOM header cannot be read: "
                     f"{type(e).__name__}: {e}") from e
  return image_record(source, exported, syntax, item_keyword,
                      uids_must_look_valid=not part10,
                      deflate_header=deflate_header)


class _ReadHeader(beam.DoFn):
  def __init__(self, remote: bool = False,
               item_keyword: str = "AccessionNumber",
               deflate_header: bool = True):
    self.remote = remote
    self.item_keyword = item_keyword
    self.deflate_header = deflate_header
    self.gcsio = None
    self.read = Count("headers_read")
    self.rejected = Count("files_rejected")
    self.bytes_read = Metrics.counter("dicom", "header_bytes_read")

  def setup(self):
    # The header is exported as written; pydicom's per-value validation
    # (regular expressions on every value) only warns, and costs ~20%.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    if self.remote:
      from apache_beam.io.gcp.gcsio import GcsIO
      self.gcsio = GcsIO()

  def process(self, source: SourceFile) -> Iterable[ImageRecord]:
    try:
      with open_source(source.path, self.gcsio) as f:
        try:
          record = read_image_record(source, f, self.item_keyword,
                                     self.deflate_header)
        finally:
          self.bytes_read.inc(f.tell())
    except Exception as e:  # pylint: disable=broad-except
      # Any failure on one file is that file's reason, never the run's end.
      self.rejected.inc()
      yield beam.pvalue.TaggedOutput(
          EXCLUDED_TAG,
          Excluded(source.path, source.entity_id, REJECTED, str(e)))
      return
    self.read.inc()
    yield record


class ReadHeaders(beam.PTransform):
  """SourceFile -> ImageRecord (main) and Excluded for bad files ('excluded').

  remote: some input is on gs://, read headers there in small ranges.
  item_keyword: the keyword whose value names a study's object.
  deflate_header: False where the records are set aside locally, not
  shuffled (a local run: transforms/spill.py).
  """

  def __init__(self, remote: bool = False, item_keyword: str = "AccessionNumber",
               deflate_header: bool = True):
    super().__init__()
    self.remote = remote
    self.item_keyword = check_keyword(item_keyword)
    self.deflate_header = deflate_header

  def expand(self, files):
    return files | "ReadHeader" >> beam.ParDo(
        _ReadHeader(self.remote, self.item_keyword,
                    self.deflate_header)).with_outputs(
            EXCLUDED_TAG, main="images")
