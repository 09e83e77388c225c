"""Image records set aside in local files while a local run groups images
into studies.

Beam's local runner (the FnApiRunner) keeps every record of a grouping in
its driver, decoded, and hands a study's whole group to the worker that
writes it; so whatever a record carries through the grouping costs memory
in proportion to the study's images, in two processes. A local run
therefore writes each kept image's record to a file of its bundle in the
run's own folder under the local temp folder (TMPDIR), its HeaderPart to a
second file beside it, and groups only a 28-byte reference per image.
A study then holds its images as SpilledImages, read back a chunk at a
time, in as few reads as the records' order allows, whenever they are
iterated (the study builder, the archive writer, the manifest, the rows,
the report). The driver deletes the folder when the run ends, whatever the
outcome.

Runs on Dataflow do not spill: their shuffle keeps grouped records outside
worker memory, and per-image reads from Cloud Storage would cost far more.
"""

import collections.abc
import dataclasses
import itertools
import os
import pickle
import struct
import uuid
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.records import (HeaderPart, ImageRecord, SourceFile,
                                SpilledHeader)
from transforms.retrieve import RetrievalError, read_range

# Spans closer than this in one file are read together, gap included.
READ_GAP_BYTES = 256 * 1024
# Images read back at once while a study's images are iterated.
IMAGES_CHUNK = 256
_LENGTH = struct.Struct("<I")
# A spilled record: its bundle's file id, then offset and length there.
IMAGE_REF = struct.Struct("<16sQI")
_RECORDS, _HEADERS = ".rec", ".hdr"


def encode_part(part: HeaderPart) -> bytes:
  columns = part.columns_json.encode("utf-8")
  return _LENGTH.pack(len(columns)) + columns + part.header_packed


def decode_part(data: bytes) -> HeaderPart:
  (n,) = _LENGTH.unpack_from(data)
  end = _LENGTH.size + n
  return HeaderPart(columns_json=data[_LENGTH.size:end].decode("utf-8"),
                    header_packed=data[end:])


def encode_record(image: ImageRecord) -> bytes:
  """A record whose header is spilled, as a tuple of its fields (the
  header's file is the record's own, beside it: only its span is kept)."""
  s, h = image.source, image.header
  return pickle.dumps((
      s.path, s.entity_id, s.relpath, s.size_bytes, s.version,
      image.study_instance_uid,
      image.series_instance_uid, image.sop_instance_uid, h.offset, h.length,
      image.study_date, image.transfer_syntax_uid, image.item_value,
      image.burned_in_annotation, image.modality),
                      protocol=pickle.HIGHEST_PROTOCOL)


def decode_record(data: bytes, header_path: str) -> ImageRecord:
  (path, entity_id, relpath, size, version, study, series, sop, header_offset,
   header_length, date, syntax, item, burned, modality) = pickle.loads(data)
  return ImageRecord(
      source=SourceFile(path, entity_id, relpath, size, version),
      study_instance_uid=study, series_instance_uid=series,
      sop_instance_uid=sop,
      header=SpilledHeader(header_path, header_offset, header_length),
      study_date=date, transfer_syntax_uid=syntax, item_value=item,
      burned_in_annotation=burned, modality=modality)


def read_plan(spans: Sequence[SpilledHeader]
              ) -> List[Tuple[str, int, int, List[int]]]:
  """(path, start, end, indices into spans) of each read: spans of one file
  no more than READ_GAP_BYTES apart come in one read."""
  plan = []
  order = sorted(range(len(spans)),
                 key=lambda i: (spans[i].path, spans[i].offset))
  for path, in_file in itertools.groupby(order, key=lambda i: spans[i].path):
    run: List[int] = []
    for i in itertools.chain(in_file, [None]):
      if run and (i is None or spans[i].offset - _end(spans[run[-1]])
                  > READ_GAP_BYTES):
        plan.append((path, spans[run[0]].offset,
                     max(_end(spans[j]) for j in run), run))
        run = []
      if i is not None:
        run.append(i)
  return plan


def read_spans(spans: Sequence[SpilledHeader]) -> List[bytes]:
  """The bytes at each span, in the same order, in read_plan's reads."""
  found: List[Optional[bytes]] = [None] * len(spans)
  for path, start, end, indices in read_plan(spans):
    try:
      data = read_range(path, start, end - start)
    except RetrievalError as e:
      raise IOError(f"{path}: spill file ends before byte {end}") from e
    for j in indices:
      at = spans[j].offset - start
      found[j] = data[at:at + spans[j].length]
  return found


def read_spilled(refs: Sequence[SpilledHeader]) -> List[HeaderPart]:
  """The HeaderParts at refs, in the same order."""
  return [decode_part(data) for data in read_spans(refs)]


def header_parts(images: Sequence[ImageRecord]) -> List[HeaderPart]:
  """The images' HeaderParts: read back where spilled, else their own."""
  spilled = [i for i, image in enumerate(images)
             if isinstance(image.header, SpilledHeader)]
  parts = [image.header for image in images]
  read = read_spilled([images[i].header for i in spilled])
  for i, part in zip(spilled, read):
    parts[i] = part
  return parts


def _end(span: SpilledHeader) -> int:
  return span.offset + span.length


def _bundle_path(directory: str, file_id: bytes, suffix: str) -> str:
  return os.path.join(directory, file_id.hex() + suffix)


def read_images(directory: str, refs: Sequence[bytes]) -> List[ImageRecord]:
  """The spilled records at refs (IMAGE_REF each), in the same order."""
  spans, header_paths, paths = [], [], {}
  for ref in refs:
    file_id, offset, length = IMAGE_REF.unpack(ref)
    if file_id not in paths:   # a bundle's two paths, built once
      paths[file_id] = (_bundle_path(directory, file_id, _RECORDS),
                        _bundle_path(directory, file_id, _HEADERS))
    records_path, headers_path = paths[file_id]
    spans.append(SpilledHeader(records_path, offset, length))
    header_paths.append(headers_path)
  return [decode_record(data, header_path)
          for data, header_path in zip(read_spans(spans), header_paths)]


@dataclasses.dataclass(frozen=True)
class SpilledImages(collections.abc.Sequence):
  """A study's images by reference (IMAGE_REF after IMAGE_REF in one bytes
  value, in the study's order), read back from the spill when used: a
  study holds ~30 bytes per image, however many it has."""
  directory: str
  refs: bytes

  @classmethod
  def of(cls, directory: str, refs: Iterable[bytes]) -> "SpilledImages":
    return cls(directory, b"".join(refs))

  def __len__(self) -> int:
    return len(self.refs) // IMAGE_REF.size

  def _refs(self, indices: Iterable[int]) -> List[bytes]:
    size = IMAGE_REF.size
    return [self.refs[i * size:(i + 1) * size] for i in indices]

  def __getitem__(self, index: Union[int, slice]):
    if isinstance(index, slice):
      return read_images(self.directory,
                         self._refs(range(len(self))[index]))
    position = range(len(self))[index]   # IndexError when out of range
    return read_images(self.directory, self._refs([position]))[0]

  def __iter__(self):
    for start in range(0, len(self), IMAGES_CHUNK):
      yield from self[start:start + IMAGES_CHUNK]


class _BundleFile:
  """One new file of a bundle, appended to; a retried bundle writes a new
  file, and the old one is never referenced."""

  def __init__(self, directory: str, file_id: bytes, suffix: str):
    self.path = _bundle_path(directory, file_id, suffix)
    self._out = open(self.path, "wb")  # pylint: disable=consider-using-with
    self._offset = 0

  def append(self, data: bytes) -> int:
    """Writes data; returns its offset."""
    self._out.write(data)
    self._offset += len(data)
    return self._offset - len(data)

  def close(self) -> None:
    self._out.close()


class _SpillImages(beam.DoFn):
  """Writes each image's HeaderPart and record to the two files of its
  bundle; both are complete when the bundle is, before any grouping hands
  their references on."""

  def __init__(self, directory: str):
    self.directory = directory
    self.spilled = Metrics.counter("spill", "header_bytes_spilled")
    self._files = None

  def start_bundle(self):
    self._files = None

  def process(self, image: ImageRecord
              ) -> Iterable[Tuple[ImageRecord, bytes]]:
    if self._files is None:
      file_id = uuid.uuid4().bytes
      self._files = (file_id, _BundleFile(self.directory, file_id, _HEADERS),
                     _BundleFile(self.directory, file_id, _RECORDS))
    file_id, headers, records = self._files
    part = encode_part(image.header)
    spilled = dataclasses.replace(image, header=SpilledHeader(
        headers.path, headers.append(part), len(part)))
    self.spilled.inc(len(part))
    data = encode_record(spilled)
    yield spilled, IMAGE_REF.pack(file_id, records.append(data), len(data))

  def finish_bundle(self):
    if self._files is not None:
      for bundle_file in self._files[1:]:
        bundle_file.close()
      self._files = None

  def teardown(self):
    self.finish_bundle()   # a failed bundle's files: closed, never read


class SpillImages(beam.PTransform):
  """ImageRecord -> (the record with a SpilledHeader, the reference
  (IMAGE_REF) of that record, written under `directory`)."""

  def __init__(self, directory: str):
    super().__init__()
    self.directory = directory

  def expand(self, images):
    return images | "SpillImage" >> beam.ParDo(_SpillImages(self.directory))
