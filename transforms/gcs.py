"""Cloud Storage client wiring and the object facts rows carry.

The client follows STORAGE_EMULATOR_HOST (the standard variable) and then
needs no credentials; in production it uses Application Default Credentials.
Clients are made in DoFn.setup() or at the call site, never at import.
"""

import os
from typing import Optional, Tuple

from transforms.records import ObjectLocation, rfc3339_utc

STORAGE_EMULATOR_HOST = "STORAGE_EMULATOR_HOST"


def storage_client(project: Optional[str] = None):
  from google.cloud import storage
  if os.environ.get(STORAGE_EMULATOR_HOST):
    from google.auth.credentials import AnonymousCredentials
    return storage.Client(project=project or "emulator-project",
                          credentials=AnonymousCredentials())
  return storage.Client(project=project)


def split_gs_uri(uri: str) -> Tuple[str, str]:
  """gs://bucket/name -> (bucket, name)."""
  if not uri.startswith("gs://"):
    raise ValueError(f"not a gs:// URI: {uri}")
  bucket, _, name = uri[len("gs://"):].partition("/")
  return bucket, name


def blob_for(client, uri: str):
  bucket, name = split_gs_uri(uri)
  return client.bucket(bucket).blob(name)


def stored_object_location(client, uri: str, bucket_uri: str, key: str
                           ) -> ObjectLocation:
  """The object's facts as Cloud Storage reports them (not local guesses)."""
  blob = blob_for(client, uri)
  blob.reload()
  return ObjectLocation(
      uri=uri, bucket=bucket_uri, object_name=key, size_bytes=blob.size,
      md5_hash=blob.md5_hash, crc32c=blob.crc32c,
      written_at=rfc3339_utc(blob.time_created),
      generation=blob.generation, download_link=blob.media_link,
      metadata_link=blob.self_link)
