"""Headers set aside in local files while a local run groups images into
studies.

Beam's local runner (the FnApiRunner) keeps every record of a grouping in
its driver, and the worker that writes a study holds all of the study's
records; headers were most of a record's bytes, so a local run's memory
grew with study size. So a local run first appends each image's HeaderPart
to a file of its bundle in the run's own folder under the local temp folder
(TMPDIR), and the record keeps only where it is; rows read the parts back
a chunk of images at a time, in as few reads as the parts' order allows.
The driver deletes the folder when the run ends, whatever the outcome.

Runs on Dataflow do not spill: their shuffle keeps grouped records outside
worker memory, and per-image reads from Cloud Storage would cost far more.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import struct
import uuid
from typing import Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.records import HeaderPart, ImageRecord, SpilledHeader
from transforms.retrieve import RetrievalError, read_range

# Parts closer than this in one file are read together, gap included.
READ_GAP_BYTES = 256 * 1024
_LENGTH = struct.Struct("<I")


def encode_part(part: HeaderPart) -> bytes:
  columns = part.columns_json.encode("utf-8")
  return _LENGTH.pack(len(columns)) + columns + part.header_packed


def decode_part(data: bytes) -> HeaderPart:
  (n,) = _LENGTH.unpack_from(data)
  end = _LENGTH.size + n
  return HeaderPart(columns_json=data[_LENGTH.size:end].decode("utf-8"),
                    header_packed=data[end:])


def read_plan(refs: Sequence[SpilledHeader]
              ) -> List[Tuple[str, int, int, List[int]]]:
  """(path, start, end, indices into refs) of each read: parts of one file
  no more than READ_GAP_BYTES apart come in one read."""
  plan = []
  order = sorted(range(len(refs)), key=lambda i: (refs[i].path, refs[i].offset))
  for path, in_file in itertools.groupby(order, key=lambda i: refs[i].path):
    run: List[int] = []
    for i in itertools.chain(in_file, [None]):
      if run and (i is None or refs[i].offset - _end(refs[run[-1]])
                  > READ_GAP_BYTES):
        plan.append((path, refs[run[0]].offset,
                     max(_end(refs[j]) for j in run), run))
        run = []
      if i is not None:
        run.append(i)
  return plan


def read_spilled(refs: Sequence[SpilledHeader]) -> List[HeaderPart]:
  """The HeaderParts at refs, in the same order, in read_plan's reads."""
  parts: List[Optional[HeaderPart]] = [None] * len(refs)
  for path, start, end, indices in read_plan(refs):
    try:
      data = read_range(path, start, end - start)
    except RetrievalError as e:
      raise IOError(f"{path}: header spill ends before byte {end}") from e
    for j in indices:
      at = refs[j].offset - start
      parts[j] = decode_part(data[at:at + refs[j].length])
  return parts


def header_parts(images: Sequence[ImageRecord]) -> List[HeaderPart]:
  """The images' HeaderParts: read back where spilled, else their own."""
  spilled = [i for i, image in enumerate(images)
             if isinstance(image.header, SpilledHeader)]
  parts = [image.header for image in images]
  read = read_spilled([images[i].header for i in spilled])
  for i, part in zip(spilled, read):
    parts[i] = part
  return parts


def _end(ref: SpilledHeader) -> int:
  return ref.offset + ref.length


class _SpillHeaders(beam.DoFn):
  """Appends each image's HeaderPart to one new file per bundle; the file
  is complete when the bundle is, before any grouping sees its records."""

  def __init__(self, directory: str):
    self.directory = directory
    self.spilled = Metrics.counter("spill", "header_bytes_spilled")
    self._out = None
    self._path = None
    self._offset = 0

  def start_bundle(self):
    self._out = None

  def process(self, image: ImageRecord) -> Iterable[ImageRecord]:
    if self._out is None:
      # A retried bundle writes a new file; the old one is never referenced.
      self._path = os.path.join(self.directory, f"{uuid.uuid4().hex}.bin")
      self._out = open(self._path, "wb")  # pylint: disable=consider-using-with
      self._offset = 0
    data = encode_part(image.header)
    self._out.write(data)
    ref = SpilledHeader(self._path, self._offset, len(data))
    self._offset += len(data)
    self.spilled.inc(len(data))
    yield dataclasses.replace(image, header=ref)

  def finish_bundle(self):
    if self._out is not None:
      self._out.close()
      self._out = None

  def teardown(self):
    self.finish_bundle()   # a failed bundle's file: closed, never read


class SpillHeaders(beam.PTransform):
  """ImageRecord with its HeaderPart -> the same record with a SpilledHeader
  in its place, the part written under `directory`."""

  def __init__(self, directory: str):
    super().__init__()
    self.directory = directory

  def expand(self, images):
    return images | "SpillHeader" >> beam.ParDo(_SpillHeaders(self.directory))
