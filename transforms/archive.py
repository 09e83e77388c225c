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
nothing that changes between runs. Members are compressed several at once in
threads and appended in order, so the bytes do not depend on the threads.
Memory is bounded: at most IN_FLIGHT_BYTES of files are held at once, and
larger files are streamed in chunks.
"""

import base64
import collections
import concurrent.futures
import datetime
import hashlib
import json
import logging
import os
import signal
import struct
import tarfile
import zlib
from typing import BinaryIO, Callable, Iterable, List, Optional, Tuple

import apache_beam as beam
import deflate
import google_crc32c
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from isal import isal_zlib

from transforms.dicom import open_source
from transforms.gcs import (blob_for, split_gs_uri, storage_client,
                            stored_object_location)
from transforms.keys import join_uri
from transforms.progress import Count
from transforms.retrieve import RetrievalError, read_range, unpack_member
from transforms.records import (COMPLETE_ROWS, FAILED, SKIP, WRITE,
                                Excluded, MemberLocation, ObjectLocation,
                                PlannedStudy, StoredStudy, Study, rfc3339_utc)

EXCLUDED_TAG = "excluded"
SKIPPED_TAG = "skipped"
MANIFEST_NAME = "manifest.json"
DEFAULT_COMPRESSION_LEVEL = 2   # isal levels are 0..3
_CHUNK = 4 << 20
_BLOCK = tarfile.BLOCKSIZE


class _HashingSink:
  """Writes through to a stream, keeping size, MD5 and CRC32C of all bytes."""

  def __init__(self, out: BinaryIO, md5: bool = True):
    self.out = out
    self.size = 0
    self.md5 = hashlib.md5() if md5 else None
    self.crc32c = google_crc32c.Checksum()

  def write(self, data: bytes) -> None:
    if data:
      self.out.write(data)
      self.size += len(data)
      if self.md5 is not None:
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


# Each image is compressed alone, so deflate restarts at every member; on
# small images ISA-L's fast levels then end ~6% above gzip -6. Members below
# SMALL_MEMBER_BYTES are compressed whole by libdeflate level 1 instead
# (about 3.5% above gzip -6, at a third of ISA-L's speed but twice
# zlib-ng level 3's); larger ones are streamed through ISA-L. The choice
# depends on the size alone, so archives stay reproducible.
SMALL_MEMBER_BYTES = 512 * 1024
SMALL_MEMBER_LEVEL = 1


def _entry_chunks(name: str, source: BinaryIO, size: int, digest):
  """One tar entry (header, the file's bytes, padding), read in chunks; the
  file's bytes also go into digest. Raises IOError if the file changed."""
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


def _gzip_member(chunks: Iterable[bytes], size: int, level: int):
  """The compressed pieces of one standard gzip member (header mtime 0)
  holding chunks; `level` is ISA-L's, for members of SMALL_MEMBER_BYTES
  and more."""
  if size < SMALL_MEMBER_BYTES:
    yield bytes(deflate.gzip_compress(b"".join(chunks), SMALL_MEMBER_LEVEL))
    return
  gz = isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)
  for chunk in chunks:
    yield gz.compress(chunk)
  yield gz.flush()


def compress_entry(name: str, opener: Callable[[str], BinaryIO], path: str,
                   size: int, level: int) -> Tuple[List[bytes], str]:
  """One file's whole gzip member, in memory, and the file's SHA-256 hex.
  Runs in a worker thread: reading, compressing and hashing all release
  the GIL, so several members are compressed at once."""
  digest = hashlib.sha256()
  with opener(path) as source:
    pieces = list(_gzip_member(_entry_chunks(name, source, size, digest),
                               size, level))
  return pieces, digest.hexdigest()


class StudyArchiveWriter:
  """Appends gzip members, one per tar entry, to a sink; remembers offsets."""

  def __init__(self, out: BinaryIO, level: int = DEFAULT_COMPRESSION_LEVEL,
               md5: bool = True):
    self.sink = _HashingSink(out, md5)
    self.level = level

  def add_compressed(self, pieces: Iterable[bytes]) -> Tuple[int, int]:
    """Appends one gzip member's pieces; returns (offset, length)."""
    offset = self.sink.size
    for piece in pieces:
      self.sink.write(piece)
    return offset, self.sink.size - offset

  def add_stream(self, name: str, source: BinaryIO, size: int
                 ) -> Tuple[int, int, str]:
    """Adds one file, streamed in chunks; returns (member_offset,
    member_length, sha256 hex)."""
    digest = hashlib.sha256()
    offset, length = self.add_compressed(_gzip_member(
        _entry_chunks(name, source, size, digest), size, self.level))
    return offset, length, digest.hexdigest()

  def add_bytes(self, name: str, data: bytes) -> Tuple[int, int]:
    padding = b"\0" * (-len(data) % _BLOCK)
    return self.add_compressed(_gzip_member(
        [tar_header(name, len(data)), data, padding], len(data), self.level))

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


# Members are compressed in threads, several at once, and appended in order.
# Files up to PARALLEL_MEMBER_BYTES are held whole while in flight, at most
# IN_FLIGHT_BYTES of them (or one larger file alone); larger ones are
# streamed in chunks by this thread. The bound is low enough that every
# study with a few large images reaches it: a study's peak memory does not
# depend on how many large images happen to queue up at once.
COMPRESSION_THREADS = min(4, os.cpu_count() or 1)
PARALLEL_MEMBER_BYTES = 32 << 20
IN_FLIGHT_BYTES = 16 << 20


def write_study_archive(study: Study, out: BinaryIO,
                        level: int = DEFAULT_COMPRESSION_LEVEL,
                        opener: Callable[[str], BinaryIO] = open_source,
                        md5: bool = True,
                        threads: int = COMPRESSION_THREADS,
                        progress: Optional[Count] = None,
                        ) -> Tuple[List[MemberLocation], _HashingSink]:
  """Writes the study's images and its manifest into out (md5=False when
  the store computes the object's MD5 itself); progress counts the input
  bytes as each image is appended."""
  writer = StudyArchiveWriter(out, level, md5)
  members: List[MemberLocation] = []
  pending = collections.deque()   # (image, member name, future), in order
  in_flight = 0

  def append(image, name, offset, length, sha256):
    members.append(MemberLocation(
        sop_instance_uid=image.sop_instance_uid, member=name,
        size_bytes=image.source.size_bytes, sha256=sha256,
        member_offset=offset, member_length=length))
    if progress is not None:
      progress.inc(image.source.size_bytes)
    crash_point("archive_member")

  def append_oldest():
    nonlocal in_flight
    image, name, future = pending.popleft()
    pieces, sha256 = future.result()
    in_flight -= image.source.size_bytes
    append(image, name, *writer.add_compressed(pieces), sha256)

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    try:
      for image in study.images:
        name = study.member_name(image)
        size = image.source.size_bytes
        if size > PARALLEL_MEMBER_BYTES:
          while pending:
            append_oldest()
          with opener(image.source.path) as source:
            append(image, name, *writer.add_stream(name, source, size))
          continue
        while pending and (len(pending) > 2 * threads
                           or in_flight + size > IN_FLIGHT_BYTES):
          append_oldest()
        pending.append((image, name, pool.submit(
            compress_entry, name, opener, image.source.path, size, level)))
        in_flight += size
      while pending:
        append_oldest()
    finally:
      for _, _, future in pending:
        future.cancel()
  manifest_at = writer.add_bytes(f"{study.archive_root}/{MANIFEST_NAME}",
                                 manifest_bytes(study, members))
  writer.close(*manifest_at)
  return members, writer.sink


def object_size(uri: str, gcs_client=None) -> Optional[int]:
  """Size of a stored object, or None when there is none."""
  if gcs_client is not None:
    bucket, name = split_gs_uri(uri)
    blob = gcs_client.bucket(bucket).get_blob(name)
    return None if blob is None else blob.size
  found = FileSystems.match([uri])[0].metadata_list
  return found[0].size_in_bytes if found else None


def read_manifest(uri: str, gcs_client=None) -> Optional[dict]:
  """The manifest of a stored object from two small ranged reads (the tail,
  then the manifest member), or None when there is no readable one."""
  size = object_size(uri, gcs_client)
  if not size:
    return None
  try:
    tail_at = max(0, size - INDEX_TAIL_BYTES)
    tail = read_range(uri, tail_at, size - tail_at, gcs_client)
    offset, length = find_manifest(tail)
    _, data = unpack_member(read_range(uri, offset, length, gcs_client))
    return json.loads(data)
  except (RetrievalError, ValueError) as e:
    logging.warning("%s has no readable manifest (%s): it will be rewritten",
                    uri, e)
    return None


def utc_timestamp(seconds: float) -> str:
  return rfc3339_utc(datetime.datetime.fromtimestamp(
      seconds, datetime.timezone.utc))


def manifest_matches(manifest: dict, study: Study) -> bool:
  """The cheap check: the stored object holds exactly these images (same
  member names, SOP instances and sizes), judged from its manifest alone."""
  stored = [(m["member"], m["sop_instance_uid"], m["size_bytes"])
            for m in manifest.get("members", [])]
  wanted = [(study.member_name(i), i.sop_instance_uid, i.source.size_bytes)
            for i in study.images]
  return stored == wanted


def members_from_manifest(manifest: dict) -> Tuple[MemberLocation, ...]:
  return tuple(MemberLocation(
      sop_instance_uid=m["sop_instance_uid"], member=m["member"],
      size_bytes=m["size_bytes"], sha256=m["sha256"],
      member_offset=m["member_offset"], member_length=m["member_length"])
               for m in manifest["members"])


def rows_are_current(current: List[tuple], members: Tuple[MemberLocation, ...]
                     ) -> bool:
  """The current rows describe exactly these members of this object."""
  return sorted((c[0], c[1], c[2]) for c in current) == sorted(
      (m.sop_instance_uid, m.sha256, m.member_offset) for m in members)


def decide(study: Study, manifest: Optional[dict], current: List[tuple]
           ) -> Tuple[str, Optional[Tuple[MemberLocation, ...]]]:
  """What a study needs (WRITE, COMPLETE_ROWS or SKIP), from its stored
  object's manifest (None: no readable object, or --overwrite) and its
  current rows; and the stored object's members, unless WRITE."""
  if manifest is not None and manifest_matches(manifest, study):
    members = members_from_manifest(manifest)
    if current and rows_are_current(current, members):
      return SKIP, members
    return COMPLETE_ROWS, members
  return WRITE, None


def crash_point(name: str) -> None:
  """Test hook: DICOM_STORAGE_CRASH_AT=<name>:<n> kills this process with
  SIGKILL the n-th time it passes <name>, to prove re-runs recover from a
  run killed at that point. Inert unless the variable is set."""
  spec = os.environ.get("DICOM_STORAGE_CRASH_AT", "")
  if not spec.startswith(name + ":"):
    return
  crash_point.hits = getattr(crash_point, "hits", 0) + 1
  if crash_point.hits >= int(spec.split(":", 1)[1]):
    os.kill(os.getpid(), signal.SIGKILL)


class _WriteStudyArchive(beam.DoFn):
  """Writes a study's object unless it is already stored; yields what rows
  need (StoredStudy), or the skipped study on the 'skipped' output."""

  def __init__(self, bucket: str, level: int, overwrite: bool):
    self.bucket = bucket
    self.level = level
    self.overwrite = overwrite
    self.gcs = None
    self.objects = Count("objects_written")
    self.skipped = Count("studies_skipped")
    self.rows_only = Count("studies_rows_completed")
    self.bytes = Count("object_bytes_written")
    self.archived = Count("source_bytes_archived")
    self.failed = Count("studies_failed")
    self.finished = Count("images_finished")
    # The run's input bytes read (the report's input_bytes_read).
    self.source_bytes = Metrics.counter("archive", "source_bytes_read")

  def setup(self):
    if self.bucket.startswith("gs://"):
      self.gcs = storage_client()

  def process(self, study: Study) -> Iterable[StoredStudy]:
    try:
      yield from self._store(study, list(study.current))
      self.finished.inc(len(study.images))
    except Exception as e:  # pylint: disable=broad-except
      self.finished.inc(len(study.images))
      self.failed.inc()
      logging.error("Study %s (%s) failed: %s", study.study_instance_uid,
                    study.object_key, e)
      for image in study.images:
        yield beam.pvalue.TaggedOutput(EXCLUDED_TAG, Excluded(
            image.source.path, study.entity_id, FAILED,
            f"study object {study.object_key} could not be written: "
            f"{type(e).__name__}: {e}"))

  def _store(self, study: Study, current: List[tuple]) -> Iterable:
    uri = join_uri(self.bucket, study.object_key)
    manifest = None if self.overwrite else read_manifest(uri, self.gcs)
    action, members = decide(study, manifest, current)
    if action == SKIP:
      self.skipped.inc()
      _, _, _, md5, size, written_at = current[0]
      yield beam.pvalue.TaggedOutput(SKIPPED_TAG, StoredStudy(
          study, ObjectLocation(uri, self.bucket, study.object_key, size,
                                md5, "", written_at), members))
      return
    if action == COMPLETE_ROWS:
      # Stored, but its rows are missing (a run ended between the object
      # and its rows): write the rows for the object as it is.
      self.rows_only.inc()
      yield StoredStudy(study, self._existing_location(uri, study), members,
                        rows_completed=True)
      return
    members, sink = self._write(uri, study)
    location = self._written_location(uri, study, sink)
    crash_point("object_written")
    self.objects.inc()
    self.bytes.inc(sink.size)
    self.source_bytes.inc(sum(m.size_bytes for m in members))
    logging.info("Stored %s (%d images, %d bytes)", uri, len(members),
                 sink.size)
    yield StoredStudy(study=study, location=location, members=tuple(members))

  def _write(self, uri: str, study: Study):
    # Cloud Storage makes an object visible only when its upload completes;
    # elsewhere write beside it and rename, so no partial object ever shows
    # under the key schema.
    atomic = FileSystems.get_scheme(uri) == "gs"
    tmp = uri if atomic else uri + ".partial"
    created = False
    try:
      # UNCOMPRESSED: by default FileSystems would gzip a .gz path again.
      with FileSystems.create(
          tmp, compression_type=CompressionTypes.UNCOMPRESSED) as out:
        created = True
        members, sink = write_study_archive(study, out, self.level,
                                            md5=self.gcs is None,
                                            progress=self.archived)
      if not atomic:
        FileSystems.rename([tmp], [uri])
      return members, sink
    except Exception:
      if created:
        _delete_quietly(tmp, self.gcs)
      raise

  def _written_location(self, uri: str, study: Study, sink) -> ObjectLocation:
    """Facts of the object just written, as the store reports them."""
    if self.gcs is not None:
      loc = stored_object_location(self.gcs, uri, self.bucket,
                                   study.object_key)
      # CRC32C is what Cloud Storage checks uploads with; it is computed
      # here at a fraction of MD5's cost (MD5 comes from Cloud Storage).
      if (loc.crc32c, loc.size_bytes) != (sink.crc32c_base64(), sink.size):
        _delete_quietly(uri, self.gcs)
        raise IOError(f"{uri}: Cloud Storage reports CRC32C {loc.crc32c} and "
                      f"{loc.size_bytes} bytes, but {sink.crc32c_base64()} "
                      f"and {sink.size} bytes were written")
      return loc
    return self._local_location(uri, study, sink)

  def _existing_location(self, uri: str, study: Study) -> ObjectLocation:
    """Facts of an object already stored (a rare path: rows were missing)."""
    if self.gcs is not None:
      return stored_object_location(self.gcs, uri, self.bucket,
                                    study.object_key)
    sink = _HashingSink(_Discard())
    with FileSystems.open(
        uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      for chunk in iter(lambda: f.read(_CHUNK), b""):
        sink.write(chunk)
    return self._local_location(uri, study, sink)

  def _local_location(self, uri: str, study: Study, sink) -> ObjectLocation:
    # The file's own modification time marks this version of the object.
    meta = FileSystems.match([uri])[0].metadata_list[0]
    return ObjectLocation(
        uri=uri, bucket=self.bucket, object_name=study.object_key,
        size_bytes=sink.size, md5_hash=sink.md5_base64(),
        crc32c=sink.crc32c_base64(),
        written_at=utc_timestamp(meta.last_updated_in_seconds))


class _Discard:
  def write(self, data: bytes) -> None:
    del data


def _delete_quietly(path: str, gcs_client=None) -> None:
  try:
    if gcs_client is not None:
      blob = blob_for(gcs_client, path)
      if blob.exists():
        blob.delete()
    elif FileSystems.exists(path):
      FileSystems.delete([path])
  except Exception:  # pylint: disable=broad-except
    logging.warning("Could not remove partial object %s", path)


class WriteStudyArchive(beam.PTransform):
  """Study -> StoredStudy (main: rows to write), 'skipped' StoredStudy
  (already stored with current rows) and Excluded for failed studies
  ('excluded')."""

  def __init__(self, bucket: str, level: int = DEFAULT_COMPRESSION_LEVEL,
               overwrite: bool = False):
    super().__init__()
    self.bucket = bucket
    self.level = level
    self.overwrite = overwrite

  def expand(self, studies):
    return studies | "WriteArchive" >> beam.ParDo(_WriteStudyArchive(
        self.bucket, self.level, self.overwrite)).with_outputs(
            EXCLUDED_TAG, SKIPPED_TAG, main="stored")


class _PlanStudyArchive(beam.DoFn):
  """Decides what a study needs, as _WriteStudyArchive would, and writes
  nothing: reads the stored object's manifest and the current rows only."""

  def __init__(self, bucket: str, overwrite: bool):
    self.bucket = bucket
    self.overwrite = overwrite
    self.gcs = None
    self.planned = Count("studies_planned")
    self.finished = Count("images_finished")

  def setup(self):
    if self.bucket.startswith("gs://"):
      self.gcs = storage_client()

  def process(self, study: Study) -> Iterable[PlannedStudy]:
    uri = join_uri(self.bucket, study.object_key)
    try:
      manifest = None if self.overwrite else read_manifest(uri, self.gcs)
    except Exception as e:  # pylint: disable=broad-except
      for image in study.images:
        yield beam.pvalue.TaggedOutput(EXCLUDED_TAG, Excluded(
            image.source.path, study.entity_id, FAILED,
            f"study object {study.object_key} could not be checked: "
            f"{type(e).__name__}: {e}"))
      return
    finally:
      self.finished.inc(len(study.images))
    self.planned.inc()
    yield PlannedStudy(study, uri, decide(study, manifest,
                                          list(study.current))[0])


class PlanStudyArchive(beam.PTransform):
  """Study -> PlannedStudy (main) and Excluded for studies whose stored
  object could not be checked ('excluded'); writes nothing."""

  def __init__(self, bucket: str, overwrite: bool = False):
    super().__init__()
    self.bucket = bucket
    self.overwrite = overwrite

  def expand(self, studies):
    return studies | "PlanArchive" >> beam.ParDo(_PlanStudyArchive(
        self.bucket, self.overwrite)).with_outputs(EXCLUDED_TAG,
                                                   main="planned")
