"""Get one image back from its study object with a single ranged read.

Each image is its own gzip member in the study's .tar.gz; a row's
storage.member_offset and storage.member_length delimit that member. Reading
exactly those bytes and decompressing them gives the image's tar entry.
"""

import hashlib
import io
import json
import tarfile
import zlib
from typing import Any, Dict, Iterable, Optional, Tuple

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems


class RetrievalError(RuntimeError):
  """The image could not be found, read, or verified."""


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
    with FileSystems.open(
        uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      f.seek(offset)
      data = f.read(length)
  if len(data) != length:
    raise RetrievalError(f"{uri}: wanted {length} bytes at {offset}, "
                         f"got {len(data)}")
  return data


def unpack_member(data: bytes) -> Tuple[str, bytes]:
  """The (name, content) of the one tar entry in one gzip member."""
  d = zlib.decompressobj(31)
  try:
    raw = d.decompress(data) + d.flush()
  except zlib.error as e:
    raise RetrievalError(f"not a gzip member: {e}") from e
  if not d.eof or d.unused_data:
    raise RetrievalError("range does not hold exactly one gzip member")
  with tarfile.open(fileobj=io.BytesIO(raw + b"\0" * 1024), mode="r:") as t:
    info = t.next()
    if info is None or not info.isfile():
      raise RetrievalError("gzip member holds no file entry")
    return info.name, t.extractfile(info).read()


def fetch_member(uri: str, offset: int, length: int,
                 sha256: Optional[str] = None, gcs_client=None
                 ) -> Tuple[str, bytes]:
  """Reads, unpacks and (when sha256 is given) verifies one image."""
  name, content = unpack_member(read_range(uri, offset, length, gcs_client))
  if sha256 and hashlib.sha256(content).hexdigest() != sha256.lower():
    raise RetrievalError(
        f"{uri} member {name}: SHA-256 mismatch (expected {sha256}, got "
        f"{hashlib.sha256(content).hexdigest()}); the object is not what the "
        "row describes")
  return name, content


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
  from transforms.current import row_files

  def lines():
    for path in row_files(metadata_dir):
      with FileSystems.open(path) as f:
        for line in f:
          yield line.decode("utf-8")
  return find_row_in_files(lines(), sop_instance_uid)
