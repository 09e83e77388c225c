"""The seekable study archive, as bytes: how the writer lays it out and how
every reader (pipeline.fetch, pipeline.export, pipeline.verify, the
writer's own check of a stored object) finds and reads its parts. Pure
code: no Beam, no I/O.

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
nothing that changes between runs.
"""

import base64
import hashlib
import io
import json
import struct
import tarfile
import zlib
from typing import BinaryIO, Callable, Iterable, List, Optional, Tuple

import deflate
import google_crc32c
from isal import isal_zlib

from transforms.records import MemberLocation, Study

MANIFEST_NAME = "manifest.json"
DEFAULT_COMPRESSION_LEVEL = 2   # isal levels are 0..3
CHUNK_BYTES = 4 << 20
_BLOCK = tarfile.BLOCKSIZE


class RetrievalError(RuntimeError):
  """An image or a manifest could not be found, read, or verified."""


class HashingSink:
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
  """A reproducible tar header: only name and size vary. The same bytes as
  tarfile's PAX format gives; made here directly (~5 us against ~25) when
  the name is ASCII and fits the ustar field, as every member name built
  from UIDs and file names does."""
  encoded = name.encode("ascii") if name.isascii() else b""
  if not 0 < len(encoded) <= _NAME_FIELD or size >= _SIZE_LIMIT:
    return _tarfile_header(name, size)
  block = (encoded.ljust(_NAME_FIELD, b"\0") + _MODE_UID_GID
           + b"%011o\0" % size + _AFTER_SIZE)
  checksum = 256 + sum(_CHECKSUMMED(block))
  return block[:148] + b"%06o\0" % checksum + block[155:]


# The ustar fields tarfile writes for a regular file of mode 0644, owner 0,
# mtime 0, no user or group name, no device numbers, and no pax header
# (tarfile.py _create_header, calc_chksum): the checksum field holds eight
# spaces while the sum is taken, then six octal digits, a NUL and a space.
_NAME_FIELD = 100
_SIZE_LIMIT = 8 ** 11
_MODE_UID_GID = b"0000644\0" + b"0000000\0" * 2
_AFTER_SIZE = (b"00000000000\0" + b" " * 8 + tarfile.REGTYPE + b"\0" * 100
               + tarfile.POSIX_MAGIC + b"\0" * 64 + b"\0" * 16
               + b"\0" * 155 + b"\0" * 12)
_CHECKSUMMED = struct.Struct("148B8x356B").unpack_from


def _tarfile_header(name: str, size: int) -> bytes:
  info = tarfile.TarInfo(name)
  info.size = size
  info.mtime = 0
  info.mode = 0o644
  info.uid = info.gid = 0
  info.uname = info.gname = ""
  return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8",
                    errors="strict")


# Each image is compressed alone, so deflate restarts at every member, and
# ISA-L's fast levels end further above gzip -6 the larger the image (level
# 3: ~1.04 at 40 KB, ~1.05 at 128 KB, ~1.07 at 288 KB). By size, measured
# on the benchmark's images (bench/README.md):
# - under TINY_MEMBER_BYTES: ISA-L level 3, as small as libdeflate level 1
#   (1.043 against 1.040 times gzip -6 on 39 KB CT slices) at 2.3 times
#   its speed; the slices of CT and MR series are mostly this size;
# - under SMALL_MEMBER_BYTES: libdeflate level 1, whole (~1.035);
# - larger: streamed through ISA-L at --compression_level.
# The choice depends on the size alone, so archives stay reproducible.
TINY_MEMBER_BYTES = 64 * 1024
TINY_MEMBER_LEVEL = 3
SMALL_MEMBER_BYTES = 512 * 1024
SMALL_MEMBER_LEVEL = 1


def _entry_chunks(name: str, source: BinaryIO, size: int, digest):
  """One tar entry (header, the file's bytes, padding), read in chunks; the
  file's bytes also go into digest. Raises IOError if the file changed."""
  yield tar_header(name, size)
  remaining = size
  while remaining > 0:
    chunk = source.read(min(CHUNK_BYTES, remaining))
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


def gzip_member(chunks: Iterable[bytes], size: int, level: int):
  """The compressed pieces of one standard gzip member (header mtime 0)
  holding chunks of a file of `size` bytes; `level` is ISA-L's, for
  members of SMALL_MEMBER_BYTES and more."""
  if size < TINY_MEMBER_BYTES:
    yield isal_zlib.compress(b"".join(chunks), TINY_MEMBER_LEVEL, 31)
    return
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
    pieces = list(gzip_member(_entry_chunks(name, source, size, digest),
                               size, level))
  return pieces, digest.hexdigest()


class StudyArchiveWriter:
  """Appends gzip members, one per tar entry, to a sink; remembers offsets."""

  def __init__(self, out: BinaryIO, level: int = DEFAULT_COMPRESSION_LEVEL,
               md5: bool = True):
    self.sink = HashingSink(out, md5)
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
    offset, length = self.add_compressed(gzip_member(
        _entry_chunks(name, source, size, digest), size, self.level))
    return offset, length, digest.hexdigest()

  def add_bytes(self, name: str, data: bytes) -> Tuple[int, int]:
    padding = b"\0" * (-len(data) % _BLOCK)
    return self.add_compressed(gzip_member(
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


def unpack_member(data: bytes) -> Tuple[str, bytes]:
  """The (name, content) of the one tar entry in one gzip member."""
  d = isal_zlib.decompressobj(31)   # ISA-L: twice zlib's speed
  try:
    raw = d.decompress(data) + d.flush()
  except (zlib.error, isal_zlib.error) as e:
    raise RetrievalError(f"not a gzip member: {e}") from e
  if not d.eof or d.unused_data:
    raise RetrievalError("range does not hold exactly one gzip member")
  with tarfile.open(fileobj=io.BytesIO(raw + b"\0" * 1024), mode="r:") as t:
    info = t.next()
    if info is None or not info.isfile():
      raise RetrievalError("gzip member holds no file entry")
    return info.name, t.extractfile(info).read()


def verified_image(member: bytes, sha256: Optional[str] = None,
                   size: Optional[int] = None, where: str = ""
                   ) -> Tuple[str, bytes]:
  """(name, content) of the image in one member's bytes, checked against
  the SHA-256 and size its row (or manifest) gives. Raises RetrievalError
  on any mismatch: the object is not what the row describes."""
  name, content = unpack_member(member)
  if size is not None and len(content) != size:
    raise RetrievalError(
        f"{where} member {name}: {len(content)} bytes, not {size}; the "
        "object is not what the row describes")
  if sha256:
    digest = hashlib.sha256(content).hexdigest()
    if digest != sha256.lower():
      raise RetrievalError(
          f"{where} member {name}: SHA-256 mismatch (expected {sha256}, got "
          f"{digest}); the object is not what the row describes")
  return name, content
