"""What a run has done so far, counted where it happens.

Every step counts with Beam counters in the namespace "dicomstore", named
below: Dataflow's job page shows them while the job runs, and the runner
sums them when it ends. Beam's local runner reports counters only at the
end, so in a local run each process also writes its own counts, at most
every FLUSH_EVERY_S, to a small file in the folder named by
$DICOMSTORE_PROGRESS_DIR (set by the driver for its workers), and the
driver reads them for the live display (pipeline/console.py). Without the
variable (Dataflow, tests of single transforms) only the Beam counters
count.
"""
import json
import os
import threading
import time
from typing import Dict, Optional

from apache_beam.metrics import Metrics

NAMESPACE = "dicomstore"
PROGRESS_DIR_ENV = "DICOMSTORE_PROGRESS_DIR"
FLUSH_EVERY_S = 0.5

# The counters, as Dataflow's UI lists them (README "Progress").
COUNTERS = {
    "files_listed": "input files found below the entity folders",
    "bytes_listed": "bytes of those files",
    "listings_done": "input roots (or entity folders) listed completely",
    "headers_read": "files whose DICOM header was read",
    "files_flagged": "files flagged by a PHI rule (never stored)",
    "files_rejected": "files rejected as bad input, with a reason",
    "studies_built": "studies grouped and named, ready to store",
    "images_kept": "images in those studies",
    "objects_written": "study objects written",
    "object_bytes_written": "bytes of the study objects written",
    "source_bytes_archived": "input bytes compressed into study objects",
    "studies_rows_completed": "objects already in place whose rows were "
                              "written",
    "studies_skipped": "studies already stored with current rows",
    "studies_failed": "studies that could not be stored",
    "studies_planned": "studies decided by a --plan run (nothing written)",
    "images_finished": "images whose study is stored, skipped, failed or "
                       "planned",
    "images_not_read": "images of unchanged entities, skipped without "
                       "reading them again",
    "rows_built": "metadata rows built",
}


class Count:
  """One of COUNTERS: a Beam counter, and in a local run part of this
  process's progress file. Made in a DoFn's constructor; pickles."""

  def __init__(self, name: str):
    if name not in COUNTERS:
      raise ValueError(f"unknown progress counter {name!r}")
    self.name = name
    self._beam = Metrics.counter(NAMESPACE, name)

  def inc(self, n: int = 1) -> None:
    self._beam.inc(n)
    _TALLY.add(self.name, n)


class _Tally:
  """This process's counts for the run whose progress folder the
  environment names, flushed to its file by a thread that starts with the
  first count (never in a process that only forks workers, so no thread is
  copied by a fork)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.counts: Dict[str, int] = {}
    self._dir: Optional[str] = None
    self._dirty = False
    self._thread: Optional[threading.Thread] = None

  def add(self, name: str, n: int) -> None:
    directory = os.environ.get(PROGRESS_DIR_ENV)
    if not directory:
      return
    with self._lock:
      if directory != self._dir:   # a new run in this process
        self.counts, self._dir = {}, directory
      self.counts[name] = self.counts.get(name, 0) + n
      self._dirty = True
      if self._thread is None:
        self._thread = threading.Thread(target=self._flush_loop, daemon=True,
                                        name="dicomstore-progress")
        self._thread.start()

  def flush(self) -> None:
    with self._lock:
      if not self._dirty:
        return
      text, directory = json.dumps(self.counts), self._dir
      self._dirty = False
    path = os.path.join(directory, f"{os.getpid()}.json")
    try:
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
      os.replace(path + ".tmp", path)
    except OSError:
      pass   # the run's folder is gone: the run is over

  def _flush_loop(self) -> None:
    while True:
      time.sleep(FLUSH_EVERY_S)
      self.flush()


_TALLY = _Tally()
# A forked worker starts with counts, a lock and a folder of its own.
os.register_at_fork(after_in_child=lambda: _TALLY.__init__())


def read_progress(directory: str) -> Dict[str, int]:
  """The counts of every process of a local run, summed."""
  totals: Dict[str, int] = {}
  try:
    names = os.listdir(directory)
  except OSError:
    return totals
  for name in names:
    if not name.endswith(".json"):
      continue
    try:
      with open(os.path.join(directory, name), encoding="utf-8") as f:
        counts = json.load(f)
    except (OSError, ValueError):
      continue   # being replaced: read on the next round
    for key, value in counts.items():
      totals[key] = totals.get(key, 0) + value
  return totals
