"""Point Beam's BigQuery clients at a local emulator -- only when one is set.

Beam 2.77's BigQuery sink uses two clients, neither of which reaches an
emulator on its own:

* the apitools ``BigqueryV2`` client (datasets, tables, load and query jobs),
  made by ``bigquery_tools.BigQueryWrapper._bigquery_client``, has its
  endpoint hard-coded to https://bigquery.googleapis.com (apache/beam#23598);
* the google-cloud-bigquery ``Client`` (streaming inserts), made in
  ``BigQueryWrapper.__init__``, follows ``BIGQUERY_EMULATOR_HOST`` for its
  endpoint but still demands Application Default Credentials.

``use_emulator_if_configured()`` replaces those two factories with ones that
use the emulator's URL and no credentials. With ``BIGQUERY_EMULATOR_HOST``
unset (production) it does nothing at all.

When ``STORAGE_EMULATOR_HOST`` is set as well, every GCP service Beam touches
is emulated, so Beam's credential lookup is also settled as "anonymous" up
front: otherwise each process spends ~20 s retrying ``google.auth.default()``
(and probes the GCE metadata server) before falling back to anonymous anyway.

Worker processes: importing this module applies the patch (same condition).
The DirectRunner's multi_processing workers (and portable SDK workers) start
fresh interpreters that inherit the environment but not our monkeypatches,
and the worker that runs Beam's ``BigQueryWriteFn`` need not import any of our
modules. Beam imports every module named in ``--beam_plugins`` at worker
start, so pipelines add ``worker_plugin_args()`` to their arguments.
"""

import os
import threading
from typing import Any, List, Optional

BIGQUERY_EMULATOR_HOST = "BIGQUERY_EMULATOR_HOST"
STORAGE_EMULATOR_HOST = "STORAGE_EMULATOR_HOST"
# google-cloud-bigquery needs *a* project for its client; inserts name the
# table's own project, so this is only a placeholder.
_PLACEHOLDER_PROJECT = "emulator-project"

_lock = threading.Lock()
_applied_host: Optional[str] = None


def emulator_host() -> Optional[str]:
  """The BigQuery emulator's base URL (with scheme), or None if unset."""
  host = os.environ.get(BIGQUERY_EMULATOR_HOST, "").strip().rstrip("/")
  if not host:
    return None
  return host if "://" in host else "http://" + host


def worker_plugin_args() -> List[str]:
  """Pipeline arguments that make Beam workers import this module.

  Empty when no emulator is configured, so production runs are unchanged.
  """
  return ["--beam_plugins=" + __name__] if emulator_host() else []


class _GcpBigQueryForEmulator:
  """Stand-in for the ``google.cloud.bigquery`` module inside bigquery_tools:
  the same module, except ``Client`` defaults to the emulator, anonymously."""

  def __init__(self, module: Any, host: str):
    self._module = module
    self._host = host

  def __getattr__(self, name: str) -> Any:
    return getattr(self._module, name)

  def Client(self, *args: Any, **kwargs: Any) -> Any:  # pylint: disable=invalid-name
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    kwargs.setdefault("credentials", AnonymousCredentials())
    kwargs.setdefault("project", os.environ.get("GOOGLE_CLOUD_PROJECT")
                      or _PLACEHOLDER_PROJECT)
    kwargs.setdefault("client_options", ClientOptions(api_endpoint=self._host))
    return self._module.Client(*args, **kwargs)


def use_emulator_if_configured() -> bool:
  """Patch Beam's BigQuery clients if BIGQUERY_EMULATOR_HOST is set.

  Idempotent and thread-safe. Returns True when the emulator is in use.
  """
  global _applied_host
  host = emulator_host()
  if host is None:
    return False
  with _lock:
    if _applied_host == host:
      return True
    from apache_beam.internal.http_client import get_new_http
    from apache_beam.io.gcp import bigquery_tools
    from apache_beam.io.gcp.internal.clients import bigquery as apitools_bq
    from google.cloud import bigquery as gcp_bigquery

    def _bigquery_client(pipeline_options: Any) -> Any:
      del pipeline_options  # no credentials for the emulator
      return apitools_bq.BigqueryV2(
          url=host + "/bigquery/v2/",
          http=get_new_http(),
          credentials=None,
          get_credentials=False,
          response_encoding="utf8")

    wrapper = bigquery_tools.BigQueryWrapper
    wrapper._bigquery_client = staticmethod(_bigquery_client)  # pylint: disable=protected-access
    bigquery_tools.gcp_bigquery = _GcpBigQueryForEmulator(gcp_bigquery, host)
    settle_credentials_if_all_emulated()
    _applied_host = host
  return True


def settle_credentials_if_all_emulated() -> None:
  """With every target emulated and no key file named, Beam's credentials
  are 'none': looking them up would only retry for ~20 s and probe the GCE
  metadata server before concluding the same."""
  if (os.environ.get(STORAGE_EMULATOR_HOST) and emulator_host()
      and not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")):
    _settle_beam_credentials_as_anonymous()


def _settle_beam_credentials_as_anonymous() -> None:
  """Make Beam's cached GCP credentials 'none' without looking them up."""
  from apache_beam.internal.gcp import auth
  creds = auth._Credentials  # pylint: disable=protected-access
  with creds._credentials_lock:  # pylint: disable=protected-access
    creds._credentials = None  # pylint: disable=protected-access
    creds._credentials_init = True  # pylint: disable=protected-access


# Applied on import, so that `--beam_plugins=transforms.bigquery_emulator`
# (see worker_plugin_args) patches each worker process too. Inert when unset.
use_emulator_if_configured()
