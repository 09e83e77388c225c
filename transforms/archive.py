"""Write one seekable, reproducible .tar.gz per study.

Format: one gzip member per tar entry (header, data and padding of one file
together), then the manifest's entry, then the end-of-archive blocks in a
final member. Concatenated gzip members are plain gzip (RFC 1952), so the
object is a standard .tar.gz for GNU tar, gzip -t and Python's tarfile; and
because each image starts a member of its own, one ranged read of
[member_offset, member_offset + member_length) decompresses to exactly that
image's tar entry. The final member's gzip header records where the
manifest member is, so the manifest can be read from the object's tail.

Reproducible: members are sorted, tar headers carry fixed mtime/uid/gid/mode
and no user names, the gzip headers have mtime 0, and the manifest holds
nothing that changes between runs. Memory is bounded: files are streamed in
chunks from the source to the destination stream.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import struct
import tarfile
import zlib
from typing import BinaryIO, Callable, Iterable, List, Optional, Tuple

import apache_beam as beam
import google_crc32c
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from isal import isal_zlib

from transforms.dicom import open_source
from transforms.keys import join_uri
from transforms.records import (FAILED, Excluded, MemberLocation,
                                ObjectLocation, StoredStudy, Study)

EXCLUDED_TAG = "excluded"
MANIFEST_NAME = "manifest.json"
DEFAULT_COMPRESSION_LEVEL = 2   # isal levels are 0..3
_CHUNK = 4 << 20
_BLOCK = tarfile.BLOCKSIZE


class _HashingSink:
  """Writes through to a stream, keeping size, MD5 and CRC32C of all bytes."""

  def __init__(self, out: BinaryIO):
    self.out = out
    self.size = 0
    self.md5 = hashlib.md5()
    self.crc32c = google_crc32c.Checksum()

  def write(self, data: bytes) -> None:
    if data:
      self.out.write(data)
      self.size += len(data)
      self.md5.update(data)
      self.crc32c.update(data)

  def md5_base64(self) -> str:
    return base64.b64encode(self.md5.digest()).decode("ascii")

  def crc32c_base64(self) -> str:
    return base64.b64encode(self.crc32c.digest()).decode("ascii")


def tar_header(name: str, size: int) -> bytes:
  """A reproducible tar header: only name and size vary."""
  info = tarfile.TarInfo(name)
  info.size = size
  info.mtime = 0
  info.mode = 0o644
  info.uid = info.gid = 0
  info.uname = info.gname = ""
  return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8",
                    errors="strict")


class StudyArchiveWriter:
  """Appends gzip members, one per tar entry, to a sink; remembers offsets."""

  def __init__(self, out: BinaryIO, level: int = DEFAULT_COMPRESSION_LEVEL):
    self.sink = _HashingSink(out)
    self.level = level

  def _member(self, chunks: Iterable[bytes]) -> Tuple[int, int]:
    offset = self.sink.size
    gz = isal_zlib.compressobj(self.level, isal_zlib.DEFLATED, 31)
    for chunk in chunks:
      self.sink.write(gz.compress(chunk))
    self.sink.write(gz.flush())
    return offset, self.sink.size - offset

  def add_stream(self, name: str, source: BinaryIO, size: int
                 ) -> Tuple[int, int, str]:
    """Adds one file; returns (member_offset, member_length, sha256 hex)."""
    digest = hashlib.sha256()

    def chunks():
      yield tar_header(name, size)
      remaining = size
      while remaining > 0:
        chunk = source.read(min(_CHUNK, remaining))
        if not chunk:
          raise IOError(f"{name}: file shrank while being read "
                        f"({size - remaining} of {size} bytes)")
        digest.update(chunk)
        remaining -= len(chunk)
        yield chunk
      if source.read(1):
        raise IOError(f"{name}: file grew while being read (listed {size} "
                      "bytes)")
      if size % _BLOCK:
        yield b"\0" * (_BLOCK - size % _BLOCK)

    offset, length = self._member(chunks())
    return offset, length, digest.hexdigest()

  def add_bytes(self, name: str, data: bytes) -> Tuple[int, int]:
    padding = b"\0" * (-len(data) % _BLOCK)
    return self._member([tar_header(name, len(data)), data, padding])

  def close(self, manifest_offset: int, manifest_length: int) -> None:
    """The end-of-archive marker, two zero blocks, in a final member whose
    gzip header carries where the manifest member is (an RFC 1952 FEXTRA
    subfield, which every gzip reader skips): a reader finds the manifest
    from the object's last bytes, without reading the rest."""
    eof = b"\0" * (2 * _BLOCK)
    deflate = isal_zlib.compressobj(self.level, isal_zlib.DEFLATED, -15)
    body = deflate.compress(eof) + deflate.flush()
    self.sink.write(
        index_member_header(manifest_offset, manifest_length) + body +
        struct.pack("<II", zlib.crc32(eof), len(eof)))


# Final member's gzip header: FEXTRA flag, mtime 0, OS unknown, one subfield
# 'DM' (DICOM manifest) holding the manifest member's offset and length.
INDEX_SUBFIELD = b"DM"
_INDEX_HEADER = (b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
                 + struct.pack("<H", 20) + INDEX_SUBFIELD + struct.pack("<H", 16))
INDEX_TAIL_BYTES = 128   # the final member is shorter than this


def index_member_header(manifest_offset: int, manifest_length: int) -> bytes:
  return _INDEX_HEADER + struct.pack("<QQ", manifest_offset, manifest_length)


def find_manifest(tail: bytes) -> Tuple[int, int]:
  """(offset, length) of the manifest member, from the object's last bytes."""
  at = tail.rfind(_INDEX_HEADER)
  if at < 0:
    raise ValueError("no manifest index at the end of the object")
  return struct.unpack_from("<QQ", tail, at + len(_INDEX_HEADER))


def manifest_bytes(study: Study, members: List[MemberLocation]) -> bytes:
  """The manifest member: what the object holds and where each image is."""
  doc = {
      "entity_id": study.entity_id,
      "study_instance_uid": study.study_instance_uid,
      "object": study.object_key,
      "members": [
          {"member": m.member, "sop_instance_uid": m.sop_instance_uid,
           "series_instance_uid": image.series_instance_uid,
           "size_bytes": m.size_bytes, "sha256": m.sha256,
           "member_offset": m.member_offset,
           "member_length": m.member_length}
          for m, image in zip(members, study.images)],
  }
  return json.dumps(doc, sort_keys=True, indent=1).encode("utf-8")


def write_study_archive(study: Study, out: BinaryIO,
                        level: int = DEFAULT_COMPRESSION_LEVEL,
                        opener: Callable[[str], BinaryIO] = open_source,
                        ) -> Tuple[List[MemberLocation], _HashingSink]:
  """Streams the study's images and its manifest into out."""
  writer = StudyArchiveWriter(out, level)
  members = []
  for image in study.images:
    name = study.member_name(image)
    with opener(image.source.path) as source:
      offset, length, sha256 = writer.add_stream(
          name, source, image.source.size_bytes)
    members.append(MemberLocation(
        sop_instance_uid=image.sop_instance_uid, member=name,
        size_bytes=image.source.size_bytes, sha256=sha256,
        member_offset=offset, member_length=length))
  manifest_at = writer.add_bytes(f"{study.archive_root}/{MANIFEST_NAME}",
                                 manifest_bytes(study, members))
  writer.close(*manifest_at)
  return members, writer.sink


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="microseconds").replace("+00:00", "Z")


class _WriteStudyArchive(beam.DoFn):
  def __init__(self, bucket: str, level: int):
    self.bucket = bucket
    self.level = level
    self.objects = Metrics.counter("archive", "objects_written")
    self.bytes = Metrics.counter("archive", "object_bytes_written")
    self.source_bytes = Metrics.counter("archive", "source_bytes_read")
    self.failed = Metrics.counter("archive", "studies_failed")

  def process(self, study: Study) -> Iterable:
    uri = join_uri(self.bucket, study.object_key)
    # Cloud Storage makes an object visible only when its upload completes;
    # elsewhere write beside it and rename, so no partial object ever shows
    # under the key schema.
    atomic = FileSystems.get_scheme(uri) == "gs"
    tmp = uri if atomic else uri + ".partial"
    created = False
    try:
      with FileSystems.create(tmp) as out:
        created = True
        members, sink = write_study_archive(study, out, self.level)
      if not atomic:
        FileSystems.rename([tmp], [uri])
    except Exception as e:  # pylint: disable=broad-except
      self.failed.inc()
      logging.error("Study %s (%s) failed: %s", study.study_instance_uid,
                    uri, e)
      if created:
        _delete_quietly(tmp)
      for image in study.images:
        yield beam.pvalue.TaggedOutput(EXCLUDED_TAG, Excluded(
            image.source.path, study.entity_id, FAILED,
            f"study object {study.object_key} could not be written: "
            f"{type(e).__name__}: {e}"))
      return
    self.objects.inc()
    self.bytes.inc(sink.size)
    self.source_bytes.inc(sum(m.size_bytes for m in members))
    logging.info("Stored %s (%d images, %d bytes)", uri, len(members),
                 sink.size)
    yield StoredStudy(
        study=study,
        location=ObjectLocation(
            uri=uri, bucket=self.bucket, object_name=study.object_key,
            size_bytes=sink.size, md5_hash=sink.md5_base64(),
            crc32c=sink.crc32c_base64(), written_at=utc_now()),
        members=tuple(members))


def _delete_quietly(path: str) -> None:
  try:
    if FileSystems.exists(path):
      FileSystems.delete([path])
  except Exception:  # pylint: disable=broad-except
    logging.warning("Could not remove partial object %s", path)


class WriteStudyArchive(beam.PTransform):
  """Study -> StoredStudy (main) and Excluded for failed studies ('excluded')."""

  def __init__(self, bucket: str, level: int = DEFAULT_COMPRESSION_LEVEL):
    super().__init__()
    self.bucket = bucket
    self.level = level

  def expand(self, studies):
    return studies | "WriteArchive" >> beam.ParDo(
        _WriteStudyArchive(self.bucket, self.level)).with_outputs(
            EXCLUDED_TAG, main="stored")
