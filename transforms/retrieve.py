"""Get one image back from its study object with a single ranged read.

Each image is its own gzip member in the study's .tar.gz; a row's
storage.member_offset and storage.member_length delimit that member. Reading
exactly those bytes and decompressing them gives the image's tar entry.
"""

import json
from typing import Any, Dict, Iterable, Optional, Tuple

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

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
    with FileSystems.open(
        uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      f.seek(offset)
      data = f.read(length)
  if len(data) != length:
    raise RetrievalError(f"{uri}: wanted {length} bytes at {offset}, "
                         f"got {len(data)}")
  return data


def fetch_member(uri: str, offset: int, length: int,
                 sha256: Optional[str] = None, gcs_client=None,
                 size: Optional[int] = None) -> Tuple[str, bytes]:
  """Reads, unpacks and verifies (against sha256 and size, when given) one
  image."""
  return verified_image(read_range(uri, offset, length, gcs_client), sha256,
                        size, uri)


def object_size(uri: str, gcs_client=None) -> Optional[int]:
  """Size of a stored object, or None when there is none."""
  if uri.startswith("gs://"):
    from transforms.gcs import split_gs_uri, storage_client
    bucket, name = split_gs_uri(uri)
    blob = (gcs_client or storage_client()).bucket(bucket).get_blob(name)
    return None if blob is None else blob.size
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
  from transforms.current import row_files

  def lines():
    for path in row_files(metadata_dir):
      with FileSystems.open(path) as f:
        for line in f:
          yield line.decode("utf-8")
  return find_row_in_files(lines(), sop_instance_uid)
