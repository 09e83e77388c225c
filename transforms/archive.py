"""Write one seekable, reproducible .tar.gz per study (the format:
transforms/archive_format.py), unless it is already stored.

Members are compressed several at once in threads and appended in order,
so the bytes do not depend on the threads. Memory is bounded: at most
IN_FLIGHT_BYTES of files are held at once, and larger files are streamed
in chunks.
"""

import collections
import concurrent.futures
import datetime
import logging
import os
import threading
from typing import (BinaryIO, Callable, Dict, Iterable, List, Optional,
                    Tuple)

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from transforms.crash import crash_point
from transforms.dicom import open_source
from transforms.gcs import blob_for, storage_client, stored_object_location
from transforms.keys import join_uri
from transforms.progress import Count
from transforms.archive_format import (CHUNK_BYTES, DEFAULT_COMPRESSION_LEVEL,
                                       MANIFEST_NAME, RetrievalError,
                                       StudyArchiveWriter, HashingSink,
                                       TINY_MEMBER_BYTES, compress_entry,
                                       manifest_bytes)
from transforms.retrieve import read_manifest
from transforms.records import (COMPLETE_ROWS, FAILED, SKIP, WRITE,
                                Excluded, MemberLocation, ObjectLocation,
                                PlannedStudy, StoredStudy, Study, rfc3339_utc)

EXCLUDED_TAG = "excluded"
SKIPPED_TAG = "skipped"


# Members are compressed in threads, several at once, and appended in order.
# Files up to PARALLEL_MEMBER_BYTES are held whole while in flight, at most
# IN_FLIGHT_BYTES of them (or one larger file alone); larger ones are
# streamed in chunks by this thread. The bound is low enough that every
# study with a few large images reaches it: a study's peak memory does not
# depend on how many large images happen to queue up at once.
COMPRESSION_THREADS = min(4, os.cpu_count() or 1)
PARALLEL_MEMBER_BYTES = 32 << 20
IN_FLIGHT_BYTES = 16 << 20
# Files under this size (a CT or MR slice: reading, hashing and compressing
# it take ~0.15 ms) are compressed by this thread: handing one to a pool
# thread and taking its result back cost as much, in Python, as the work.
INLINE_MEMBER_BYTES = TINY_MEMBER_BYTES
# A study of more than this many input bytes is written at the end of its
# bundle, after the bundle's smaller studies. A worker compresses a large
# study's members on every core; its small studies, compressed one member
# at a time, are written meanwhile by the other workers' studies if they
# come first, and alone on one core if they come after it.
LARGE_STUDY_BYTES = 256 << 20


_pools: Dict[Tuple[int, int], concurrent.futures.ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def compression_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
  """The process's pool of `threads` compression threads, made at its first
  use (in a worker, after the fork) and kept: a pool per study started and
  joined up to four threads for each of thousands of small studies. Keyed
  by process too: a process forked after the pool was made has none of
  its threads, and gets a pool of its own."""
  key = (os.getpid(), threads)
  with _pools_lock:
    pool = _pools.get(key)
    if pool is None:
      pool = _pools[key] = concurrent.futures.ThreadPoolExecutor(
          threads, thread_name_prefix="compress")
    return pool


def write_study_archive(study: Study, out: BinaryIO,
                        level: int = DEFAULT_COMPRESSION_LEVEL,
                        opener: Callable[[str], BinaryIO] = open_source,
                        md5: bool = True,
                        threads: int = COMPRESSION_THREADS,
                        progress: Optional[Count] = None,
                        ) -> Tuple[List[MemberLocation], HashingSink]:
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

  pool = compression_pool(threads)
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
      if size < INLINE_MEMBER_BYTES:
        while pending:
          append_oldest()
        pieces, sha256 = compress_entry(name, opener, image.source.path,
                                        size, level)
        append(image, name, *writer.add_compressed(pieces), sha256)
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


def utc_timestamp(seconds: float) -> str:
  return rfc3339_utc(datetime.datetime.fromtimestamp(
      seconds, datetime.timezone.utc))


def stored_manifest(uri: str, gcs_client=None) -> Optional[dict]:
  """The manifest of the study's stored object, or None when there is no
  readable one (the study is then written)."""
  try:
    return read_manifest(uri, gcs_client)
  except RetrievalError as e:
    logging.warning("%s has no readable manifest (%s): it will be rewritten",
                    uri, e)
    return None


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


class _WriteStudyArchive(beam.DoFn):
  """Writes a study's object unless it is already stored; yields what rows
  need (StoredStudy), or the skipped study on the 'skipped' output."""

  def __init__(self, bucket: str, level: int, overwrite: bool,
               run_id: str = "run"):
    self.bucket = bucket
    self.level = level
    self.overwrite = overwrite
    self.run_id = run_id
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

  def start_bundle(self):
    self._large: List[Study] = []

  def process(self, study: Study) -> Iterable[StoredStudy]:
    if study.input_bytes > LARGE_STUDY_BYTES:
      self._large.append(study)   # a few small records: written last
      return
    yield from self._store_or_fail(study)

  def finish_bundle(self):
    large, self._large = self._large, []
    for study in large:
      for output in self._store_or_fail(study):
        if isinstance(output, beam.pvalue.TaggedOutput):
          yield beam.pvalue.TaggedOutput(
              output.tag, GlobalWindows.windowed_value(output.value))
        else:
          yield GlobalWindows.windowed_value(output)

  def _store_or_fail(self, study: Study) -> Iterable:
    try:
      yield from self._store(study, list(study.current))
    except Exception as e:  # pylint: disable=broad-except
      self.failed.inc()
      logging.error("Study %s (%s) failed: %s", study.study_instance_uid,
                    study.object_key, e)
      for image in study.images:
        yield beam.pvalue.TaggedOutput(EXCLUDED_TAG, Excluded(
            image.source.path, study.entity_id, FAILED,
            f"study object {study.object_key} could not be written: "
            f"{type(e).__name__}: {e}"))
    finally:
      self.finished.inc(len(study.images))

  def _store(self, study: Study, current: List[tuple]) -> Iterable:
    uri = join_uri(self.bucket, study.object_key)
    manifest = None if self.overwrite else stored_manifest(uri, self.gcs)
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
    # A name of this run's own: two writers never share a partial file.
    tmp = uri if atomic else f"{uri}.{self.run_id}.partial"
    if not atomic:
      _remove_partials(uri)   # left by killed runs (this run holds the lease)
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
    sink = HashingSink(_Discard())
    with FileSystems.open(
        uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
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


def _remove_partials(uri: str) -> None:
  """<key>.<run id>.partial files of killed runs (and the <key>.partial of
  earlier versions), found without globbing: a key may hold glob
  characters."""
  folder, name = os.path.split(uri)
  try:
    names = os.listdir(folder)
  except OSError:
    return
  for other in names:
    if other.startswith(name + ".") and other.endswith(".partial"):
      os.unlink(os.path.join(folder, other))


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
               overwrite: bool = False, run_id: str = "run"):
    super().__init__()
    self.bucket = bucket
    self.level = level
    self.overwrite = overwrite
    self.run_id = run_id

  def expand(self, studies):
    return studies | "WriteArchive" >> beam.ParDo(_WriteStudyArchive(
        self.bucket, self.level, self.overwrite, self.run_id)).with_outputs(
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
      manifest = None if self.overwrite else stored_manifest(uri, self.gcs)
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
