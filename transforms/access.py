"""Before any work: can we reach the bucket and the dataset? If not, say
what is missing and how to fix it, naming no secret.

Skipped for targets served by a local emulator (STORAGE_EMULATOR_HOST,
BIGQUERY_EMULATOR_HOST), which take no credentials.
"""

import os
from typing import Optional

from transforms import bigquery_emulator

FIX_CREDENTIALS = (
    "Set GOOGLE_APPLICATION_CREDENTIALS to the path of a service-account key "
    "file, or run `gcloud auth application-default login`, or run on Google "
    "Cloud with a service account attached.")
BUCKET_ROLES = ("the identity needs object create and read on the bucket "
                "(roles/storage.objectAdmin on gs://{bucket})")
DATASET_ROLES = ("the identity needs roles/bigquery.dataEditor on dataset "
                 "{project}:{dataset} (or roles/bigquery.user on project "
                 "{project} to create it)")


class AccessError(RuntimeError):
  """Credentials or permissions are missing; the message says which."""


def _needs_credentials(bucket: str, table: Optional[str]) -> bool:
  gcs = bucket.startswith("gs://") and not os.environ.get("STORAGE_EMULATOR_HOST")
  bq = bool(table) and not bigquery_emulator.emulator_host()
  return gcs or bq


def find_credentials():
  """Application Default Credentials, or AccessError saying what is missing."""
  key_file = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
  if key_file is not None and not os.path.isfile(key_file):
    raise AccessError(
        f"GOOGLE_APPLICATION_CREDENTIALS points at {key_file!r}, which is not "
        f"a readable file. {FIX_CREDENTIALS}")
  import google.auth
  from google.auth.exceptions import DefaultCredentialsError
  try:
    credentials, _ = google.auth.default(
        scopes=["https://www.googleapis.com/auth/cloud-platform"])
  except DefaultCredentialsError as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise AccessError(f"No Google Cloud credentials found ({first}). "
                      f"{FIX_CREDENTIALS}") from e
  return credentials


def explain_forbidden(error: Exception, bucket: Optional[str] = None,
                      table: Optional[str] = None) -> str:
  """A permission error as what to grant."""
  if bucket:
    return f"{error}: " + BUCKET_ROLES.format(bucket=bucket)
  project, _, rest = (table or "").partition(":")
  return f"{error}: " + DATASET_ROLES.format(
      project=project, dataset=rest.partition(".")[0])


def check_cloud_access(bucket: str, table: Optional[str]) -> None:
  """Fails fast when credentials cannot be found; the reachability of the
  bucket and the dataset is checked by the caller's first real calls."""
  if _needs_credentials(bucket, table):
    find_credentials()
