"""Read parts of stored study objects: byte ranges, the manifest from an
object's tail, and images.

Each image is its own gzip member in the study's .tar.gz; a row's
storage.member_offset and storage.member_length delimit that member.
Reading exactly those bytes and decompressing them gives the image's tar
entry. Images that lie close together in one object are read in one
request (read_members): its bytes are cut into members as they arrive, so
only one member is held at a time. pipeline.fetch (one image) and
pipeline.export (a cohort) both read and verify images this way.
"""

import collections
import json
import os
from typing import (Any, Callable, Dict, Iterable, List, NamedTuple, Optional,
                    Sequence, Tuple)

from transforms.files import is_local, open_binary
from transforms.archive_format import (INDEX_TAIL_BYTES, RetrievalError,
                                       find_manifest, unpack_member,
                                       verified_image)


def read_range(uri: str, offset: int, length: int, gcs_client=None) -> bytes:
  """Exactly bytes [offset, offset+length) of an object or file."""
  if offset < 0 or length <= 0:
    raise RetrievalError(f"bad range: offset {offset}, length {length}")
  if uri.startswith("gs://"):
    from transforms.gcs import blob_for, storage_client
    blob = blob_for(gcs_client or storage_client(), uri)
    # One HTTP request with a Range header: only this member is transferred.
    data = blob.download_as_bytes(start=offset, end=offset + length - 1,
                                  checksum=None)
  else:
    with open_binary(uri) as f:
      f.seek(offset)
      data = f.read(length)
  if len(data) != length:
    raise RetrievalError(f"{uri}: wanted {length} bytes at {offset}, "
                         f"got {len(data)}")
  return data


class Member(NamedTuple):
  """Where one image lies in its object, and what it must be."""
  offset: int
  length: int
  sha256: Optional[str] = None
  size: Optional[int] = None


# Members this close together are read in one request, the gap's bytes
# read and dropped: less than a request costs.
READ_GAP_BYTES = 64 * 1024
_STREAM_CHUNK = 1 << 20


def member_runs(members: Sequence[Member], gap: int = READ_GAP_BYTES
                ) -> List[List[Member]]:
  """Members (sorted by offset) in runs that one request each reads:
  adjacent, or apart by at most gap bytes."""
  runs: List[List[Member]] = []
  for member in sorted(members, key=lambda m: m.offset):
    if runs and member.offset - (runs[-1][-1].offset + runs[-1][-1].length
                                 ) <= gap:
      runs[-1].append(member)
    else:
      runs.append([member])
  return runs


class _MemberCutter:
  """A sink for the bytes of one run, from its first member's offset on:
  hands each member's bytes to `found` as soon as they have all arrived,
  keeping no more than one member (and a chunk) at a time."""

  def __init__(self, run: Sequence[Member], found: Callable[[Member, bytes],
                                                           None]):
    self.position = run[0].offset
    self.pending = collections.deque(run)
    self.buffer = bytearray()
    self.found = found
    self.bytes_read = 0

  def write(self, data: bytes) -> None:
    self.bytes_read += len(data)
    self.buffer += data
    while self.pending:
      member = self.pending[0]
      end = member.offset + member.length
      if self.position + len(self.buffer) < end:
        return
      start = member.offset - self.position
      data = bytes(self.buffer[start:start + member.length])
      del self.buffer[:start + member.length]
      self.position = end
      self.pending.popleft()
      self.found(member, data)
    self.buffer.clear()   # past the last member: nothing more is wanted


def stream_range(uri: str, start: int, end: int, sink, gcs_client=None,
                 generation: Optional[int] = None) -> None:
  """Writes bytes [start, end) of an object to sink.write as they arrive:
  one ranged GET on gs:// (of the given generation, when given)."""
  if uri.startswith("gs://"):
    from transforms.gcs import split_gs_uri, storage_client
    bucket, name = split_gs_uri(uri)
    blob = (gcs_client or storage_client()).bucket(bucket).blob(
        name, generation=generation)
    blob.download_to_file(sink, start=start, end=end - 1, checksum=None)
    return
  with open_binary(uri) as f:
    f.seek(start)
    remaining = end - start
    while remaining > 0:
      chunk = f.read(min(_STREAM_CHUNK, remaining))
      if not chunk:
        return
      sink.write(chunk)
      remaining -= len(chunk)


def read_members(uri: str, run: Sequence[Member],
                 found: Callable[[Member, str, bytes], None],
                 gcs_client=None, generation: Optional[int] = None,
                 unusable: Optional[Callable[[Member, RetrievalError],
                                             None]] = None) -> int:
  """Reads one run of members (member_runs) in one request; for each, in
  order, calls found(member, name, content) with the image unpacked and
  verified against its SHA-256 and size. A member that is not what it
  should be goes to unusable(member, error), and the others are still
  read (without unusable, the error is raised). Raises RetrievalError or
  the store's error when the object cannot be read (members already found
  stay found). Returns the bytes read."""
  def check(member: Member, data: bytes) -> None:
    try:
      name, content = verified_image(data, member.sha256, member.size, uri)
    except RetrievalError as e:
      if unusable is None:
        raise
      unusable(member, e)
      return
    found(member, name, content)

  cutter = _MemberCutter(run, check)
  stream_range(uri, run[0].offset, run[-1].offset + run[-1].length, cutter,
               gcs_client, generation)
  if cutter.pending:
    member = cutter.pending[0]
    raise RetrievalError(
        f"{uri} ends before byte {member.offset + member.length} (member at "
        f"{member.offset}): the object is not what the rows describe")
  return cutter.bytes_read


def fetch_member(uri: str, offset: int, length: int,
                 sha256: Optional[str] = None, gcs_client=None,
                 size: Optional[int] = None) -> Tuple[str, bytes]:
  """One image: read with one ranged request, unpacked, and verified
  against sha256 and size when given."""
  if offset < 0 or length <= 0:
    raise RetrievalError(f"bad range: offset {offset}, length {length}")
  got = []
  read_members(uri, [Member(offset, length, sha256, size)],
               lambda _, name, content: got.append((name, content)),
               gcs_client)
  return got[0]


def object_size(uri: str, gcs_client=None) -> Optional[int]:
  """Size of a stored object, or None when there is none."""
  if uri.startswith("gs://"):
    from transforms.gcs import split_gs_uri, storage_client
    bucket, name = split_gs_uri(uri)
    blob = (gcs_client or storage_client()).bucket(bucket).get_blob(name)
    return None if blob is None else blob.size
  if is_local(uri):
    try:
      return os.path.getsize(uri)
    except OSError:
      return None
  from apache_beam.io.filesystems import FileSystems
  found = FileSystems.match([uri])[0].metadata_list
  return found[0].size_in_bytes if found else None


def read_manifest(uri: str, gcs_client=None) -> Optional[dict]:
  """The manifest of a stored object from two small ranged reads (the tail,
  then the manifest member); None when there is no object. Raises
  RetrievalError when there is one without a readable manifest."""
  size = object_size(uri, gcs_client)
  if size is None:
    return None
  if not size:
    raise RetrievalError("empty object")
  tail_at = max(0, size - INDEX_TAIL_BYTES)
  tail = read_range(uri, tail_at, size - tail_at, gcs_client)
  try:
    offset, length = find_manifest(tail)
    _, data = unpack_member(read_range(uri, offset, length, gcs_client))
    return json.loads(data)
  except ValueError as e:
    raise RetrievalError(str(e)) from e


def find_row_in_files(lines: Iterable[str], sop_instance_uid: str
                      ) -> Optional[Dict[str, Any]]:
  """The newest row (by storage.written_at) for a SOP instance among
  newline-delimited JSON lines."""
  found = None
  for line in lines:
    if sop_instance_uid in line:
      row = json.loads(line)
      if row.get("sop_instance_uid") == sop_instance_uid and (
          found is None or row["storage"]["written_at"] >=
          found["storage"]["written_at"]):
        found = row
  return found


def find_row_in_folder(metadata_dir: str, sop_instance_uid: str
                       ) -> Optional[Dict[str, Any]]:
  """The current row of one image among all runs' row files in a folder."""
  from transforms.schema import row_files

  def lines():
    for path in row_files(metadata_dir):
      with open_binary(path) as f:
        for line in f:
          yield line.decode("utf-8")
  return find_row_in_files(lines(), sop_instance_uid)
