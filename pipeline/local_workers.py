"""The local (DirectRunner) run: Beam's FnApiRunner with one worker process
per core, whose start-up overlaps the driver's.

Each of Beam's worker processes imports Beam and our transforms, ~2 s of
one core, and the runner starts them only once the graph is built: ~10% of
a run over a few thousand images. Here one warm process
(pipeline/worker_zygote.py) does those imports while the driver is still
importing and building, then forks the workers the runner asks for (and
becomes the last one itself). The
runner still starts and stops workers its own way; only the command it
runs for each changes (pipeline/worker_attach.py), and that command falls
back to Beam's own worker when no warm process answers.
"""

import argparse
import atexit
import ctypes
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import List, Optional

MMAP_THRESHOLD = 256 * 1024
STOP_TIMEOUT_S = 10
ATTACH_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "worker_attach.py")


def return_large_buffers_to_the_os() -> None:
  """Large transient buffers (4 MiB reads, compressed chunks, bundles of
  rows) go straight back to the OS instead of fragmenting glibc's heap,
  which otherwise made memory grow with the number of images (make
  bench-memory): this process via mallopt, worker processes (started
  later) via the environment variable glibc reads at start."""
  os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
  try:
    ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
  except (OSError, AttributeError):
    pass  # not glibc: nothing to tune


def default_worker_count() -> int:
  return os.cpu_count() or 1


def _runner_arguments(argv: List[str]) -> Optional[argparse.Namespace]:
  """--runner and the DirectRunner's options, read without importing Beam;
  None when malformed (Beam's parser will say so)."""
  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  parser.add_argument("--runner")
  parser.add_argument("--direct_running_mode")
  parser.add_argument("--direct_num_workers", type=int)
  try:
    return parser.parse_known_args(argv)[0]
  except SystemExit:
    return None


def runs_locally(argv: List[str]) -> bool:
  """Whether these arguments run the pipeline here (the DirectRunner)."""
  known = _runner_arguments(argv)
  return known is not None and known.runner in (None, "DirectRunner")


def local_worker_count(argv: List[str]) -> int:
  """How many worker processes these arguments give a DirectRunner run
  (one per core by default), or 0 for a run without worker processes (in
  one process, or on another runner). Read without importing Beam."""
  known = _runner_arguments(argv)
  if (known is None or known.runner not in (None, "DirectRunner") or
      known.direct_running_mode not in (None, "multi_processing")):
    return 0
  if (known.direct_running_mode is None and known.direct_num_workers is None
      and small_local_input(argv)):
    return 0
  return known.direct_num_workers or default_worker_count()


# An input of at most this many local files runs in the driver's own
# process: starting worker processes (~2 s of imports, overlapped with the
# driver's) would take longer than the work.
SMALL_INPUT_FILES = 64


def small_local_input(argv: List[str], limit: int = SMALL_INPUT_FILES
                      ) -> bool:
  """Whether --input names local folders holding at most `limit` files in
  all (counted until the limit is passed). Read without importing Beam."""
  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  parser.add_argument("--input")
  try:
    roots = (parser.parse_known_args(argv)[0].input or "").split(",")
  except SystemExit:
    return False
  roots = [r.strip() for r in roots if r.strip()]
  if not roots or any("://" in r or set(r) & set("*?[") or
                      not os.path.isdir(r) for r in roots):
    return False
  count = 0
  for root in roots:
    for _, _, names in os.walk(root):
      count += len(names)
      if count > limit:
        return False
  return True


class WarmWorkers:
  """One warm process that forks `workers` workers, and the command that
  attaches to it."""

  def __init__(self, workers: int):
    return_large_buffers_to_the_os()
    self._dir = tempfile.mkdtemp(prefix="dicomstore-workers-")
    self.socket_path = os.path.join(self._dir, "warm.sock")
    self._process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.worker_zygote", self.socket_path,
         str(workers)])
    atexit.register(self.stop)

  def attach_command(self) -> str:
    return " ".join(shlex.quote(a) for a in (
        sys.executable, "-I", "-S", ATTACH_SCRIPT, self.socket_path))

  def stop(self) -> None:
    """Stops the warm process if it still waits (the workers it forked exit
    with the run), removes its socket."""
    if self._process.poll() is None:
      self._process.terminate()
      try:
        self._process.wait(timeout=STOP_TIMEOUT_S)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
    shutil.rmtree(self._dir, ignore_errors=True)
    atexit.unregister(self.stop)


_early: Optional[WarmWorkers] = None


def start_early(argv: List[str]) -> None:
  """Called by the command line before it imports Beam."""
  global _early  # pylint: disable=global-statement
  workers = 0 if {"--help", "-h"} & set(argv) else local_worker_count(argv)
  if _early is None and workers:
    _early = WarmWorkers(workers)


def take_warm_workers(workers: int) -> WarmWorkers:
  """The warm process started early for this run, or a new one."""
  global _early  # pylint: disable=global-statement
  warm, _early = _early, None
  return warm or WarmWorkers(workers)
