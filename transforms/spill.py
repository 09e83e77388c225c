"""Headers set aside in files while their images are grouped into studies.

A study's image records are held whole where the study is grouped and
written (the local runner even keeps every grouped record in its driver),
and headers were most of a record's bytes: memory grew with study size.
So before the grouping each image's HeaderPart is appended to a file of its
bundle under the run's spill folder (on --temp_location, else the local
temp folder) and the record keeps only where it is. Rows read the parts
back a chunk of images at a time, in as few reads as the parts' order
allows, and the folder is deleted once every row is built (and by the
driver of a local run, whatever the outcome).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import shutil
import struct
import uuid
from typing import Iterable, List, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.gcs import split_gs_uri, storage_client
from transforms.keys import join_uri
from transforms.records import HeaderPart, ImageRecord, SpilledHeader
from transforms.retrieve import read_range

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


def read_spilled(refs: Sequence[SpilledHeader], gcs_client=None
                 ) -> List[HeaderPart]:
  """The HeaderParts at refs, in the same order. Parts of one file that lie
  close together come in one read."""
  parts: List[Optional[HeaderPart]] = [None] * len(refs)
  order = sorted(range(len(refs)), key=lambda i: (refs[i].path, refs[i].offset))
  for path, in_file in itertools.groupby(order, key=lambda i: refs[i].path):
    run: List[int] = []
    for i in itertools.chain(in_file, [None]):
      if run and (i is None or refs[i].offset - _end(refs[run[-1]])
                  > READ_GAP_BYTES):
        start = refs[run[0]].offset
        data = read_range(path, start, max(_end(refs[j]) for j in run) - start,
                          gcs_client)
        for j in run:
          at = refs[j].offset - start
          parts[j] = decode_part(data[at:at + refs[j].length])
        run = []
      if i is not None:
        run.append(i)
  return parts


def header_parts(images: Sequence[ImageRecord], gcs_client=None
                 ) -> List[HeaderPart]:
  """The images' HeaderParts: read back where spilled, else their own."""
  spilled = [i for i, image in enumerate(images)
             if isinstance(image.header, SpilledHeader)]
  parts = [image.header for image in images]
  for i, part in zip(spilled, read_spilled(
      [images[i].header for i in spilled], gcs_client)):
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
      self._path = join_uri(self.directory, f"{uuid.uuid4().hex}.bin")
      self._out = FileSystems.create(
          self._path, compression_type=CompressionTypes.UNCOMPRESSED)
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

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_out"] = None
    return state


class SpillHeaders(beam.PTransform):
  """ImageRecord with its HeaderPart -> the same record with a SpilledHeader
  in its place, the part written under `directory`."""

  def __init__(self, directory: str):
    super().__init__()
    self.directory = directory

  def expand(self, images):
    return images | "SpillHeader" >> beam.ParDo(_SpillHeaders(self.directory))


def delete_spill(directory: str) -> None:
  """Removes the spill folder and all in it; nothing when there is none."""
  try:
    if directory.startswith("gs://"):
      bucket, name = split_gs_uri(directory.rstrip("/"))
      # One object per bundle that set headers aside.
      for blob in storage_client().list_blobs(bucket, prefix=name + "/"):
        blob.delete()
    elif os.path.isdir(directory):
      shutil.rmtree(directory)
  except Exception as e:  # pylint: disable=broad-except
    # Its parts are copies of rows already built: worth a warning, not a
    # failed run.
    logging.warning("Could not remove header spill folder %s: %s",
                    directory, e)


def _delete_after(directory: str, done: int) -> Iterable[str]:
  del done   # only orders this step after the rows
  delete_spill(directory)
  yield directory


class DeleteSpill(beam.PTransform):
  """Deletes the spill folder once the PCollection it is applied to (the
  last reader of spilled headers) is complete."""

  def __init__(self, directory: str):
    super().__init__()
    self.directory = directory

  def expand(self, last_readers):
    done = last_readers | "CountDone" >> beam.combiners.Count.Globally()
    return (last_readers.pipeline
            | "Folder" >> beam.Create([self.directory])
            | "Delete" >> beam.FlatMap(_delete_after,
                                       beam.pvalue.AsSingleton(done)))
