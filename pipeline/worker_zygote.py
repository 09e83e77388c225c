"""The warm worker process: imports Beam's worker and this pipeline's
transforms once, then, per request on its socket, forks a ready worker (the
last request it serves itself).

`python -m pipeline.worker_zygote SOCKET WORKERS`, started by
pipeline/local_workers.py at the start of a local run, so that the ~2 s of
imports each worker would otherwise spend after the graph is built happen
while the driver builds it.
"""
import ctypes
import gc
import importlib
import json
import os
import signal
import socket
import sys
import traceback

from pipeline import lazy_imports

# Everything the workers import anyway; imported once, before any thread or
# gRPC channel exists, so forking afterwards is safe.
WARM_MODULES = (
    "apache_beam.runners.worker.sdk_worker_main",
    "transforms.archive", "transforms.current", "transforms.dicom",
    "transforms.discover", "transforms.phi", "transforms.report",
    "transforms.rows", "transforms.sinks", "transforms.studies",
)
PR_SET_PDEATHSIG = 1


def _exit_with_parent() -> None:
  """The driver that started us may die without stopping us: follow it."""
  try:
    ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
  except (OSError, AttributeError):
    pass


def _run_worker(conn: socket.socket) -> None:
  """In the forked child: take the runner's environment, run Beam's worker,
  report its exit code on the connection. Never returns."""
  code = 1
  try:
    with conn.makefile("rb") as lines:
      environment = json.loads(lines.readline())
    os.environ.clear()
    os.environ.update(environment)
    conn.sendall(b"S")
    from apache_beam.runners.worker import sdk_worker_main
    sdk_worker_main.main(sys.argv)
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
  finally:
    try:
      conn.sendall(bytes([code & 0xFF]))
    except OSError:
      pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access


def import_warm_modules() -> None:
  """What every worker imports, less what no worker uses
  (pipeline/lazy_imports.py)."""
  lazy_imports.leave_out_unused()
  lazy_imports.defer_cloud_clients(lazy_imports.NEVER_USED_BY_WORKERS)
  for name in WARM_MODULES:
    importlib.import_module(name)
  # Each worker builds its bundles' DoFns too; imported after the above,
  # as it imports Beam.
  importlib.import_module("pipeline.beam_tuning").apply()


def serve(socket_path: str, workers: int) -> None:
  """Forks `workers` - 1 workers, one per request, and becomes the last one
  itself: the runner asks for them all at once, and an idle warm process
  would only hold memory. A later request finds no one listening and
  starts Beam's own worker."""
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  listener.bind(socket_path)  # requests queue here while we import
  listener.listen(64)
  _exit_with_parent()
  # Python's recipe for forking without exec: no collection while importing,
  # then the imported objects frozen out of every later collection, so the
  # workers' collections neither scan them (~1% of a worker's CPU) nor
  # write to (and so copy) the pages they share with each other.
  gc.disable()
  import_warm_modules()
  gc.freeze()
  for served in range(1, workers + 1):
    conn, _ = listener.accept()
    if served == workers or os.fork() == 0:
      listener.close()
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
      gc.enable()
      _run_worker(conn)
    conn.close()


if __name__ == "__main__":
  signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # pylint: disable=protected-access
  serve(sys.argv[1], int(sys.argv[2]))
