"""The operator's console: what a person watching a run sees, and the run's
full log.

By default the console shows one line when the run starts, live progress
(on a terminal a line redrawn twice a second; otherwise a plain line every
30 s, for cron and schedulers), warnings and errors of the pipeline's own
code and errors of anything else, and the summary. --verbose shows every
log line too. Every log line of the run, the driver's and the workers'
(Beam's local runner relays those to the driver), INFO and up, goes to
the run's log file beside the report: nothing is lost by being quiet.
Shared by every command of the pipeline (run, export, verify).
"""
import codecs
import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, Iterator, Optional, TextIO

from transforms.files import is_local
from transforms.records import duration  # noqa: F401  (the commands' too)


PLAIN_EVERY_S = 30.0
LIVE_EVERY_S = 0.5
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OUR_CODE = tuple(os.path.join(_ROOT, d) + os.sep
                  for d in ("pipeline", "transforms"))


class Console:
  """Lines for a person, and one status line kept below them: redrawn in
  place on a terminal, printed as a plain line otherwise."""

  def __init__(self, stream: Optional[TextIO] = None,
               live: Optional[bool] = None):
    self.stream = stream or sys.stderr
    self.live = self.stream.isatty() if live is None else live
    self._lock = threading.RLock()
    self._shown = ""

  def _clear(self) -> None:
    if self._shown:
      self.stream.write("\r\x1b[2K")
      self.stream.flush()
      self._shown = ""

  def line(self, text: str, stream: Optional[TextIO] = None) -> None:
    """A line of its own (on stdout by default), above the status line."""
    with self._lock:
      self._clear()
      out = stream or sys.stdout
      out.write(text + "\n")
      out.flush()

  def status(self, text: str) -> None:
    with self._lock:
      if self.live:
        width = shutil.get_terminal_size((120, 20)).columns - 1
        self.stream.write("\r\x1b[2K" + text[:width])
        self._shown = text
      else:
        self.stream.write(text + "\n")
      self.stream.flush()

  def end_status(self) -> None:
    with self._lock:
      self._clear()

  @contextlib.contextmanager
  def logging_to_console(self, verbose: bool) -> Iterator[None]:
    """Log records shown on this console while the block runs: all of them
    (INFO and up) with verbose, else those worth a person's attention."""
    handler = _ConsoleHandler(self, verbose)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
      yield
    finally:
      root.removeHandler(handler)


class _ConsoleHandler(logging.Handler):
  def __init__(self, console: Console, verbose: bool):
    super().__init__(logging.INFO if verbose else logging.WARNING)
    self.console = console
    self.verbose = verbose
    self.addFilter(unwrap_worker_record)

  def filter(self, record: logging.LogRecord) -> bool:
    if not super().filter(record):
      return False
    return (self.verbose or record.levelno >= logging.ERROR
            or where(record).startswith(_OUR_CODE))

  def emit(self, record: logging.LogRecord) -> None:
    try:
      message = record.getMessage()
      if self.verbose:
        text = f"{record.levelname} {short_where(record)}: {message}"
      else:
        text = f"{record.levelname.lower()}: {message}"
      self.console.line(text, self.console.stream)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


# Beam's local runner logs each worker's record in the driver as
# 'Worker: <LogEntry in protobuf text form>'.
_WORKER_MESSAGE = re.compile(r'(?:^| )message: "((?:[^"\\]|\\.)*)"')
_WORKER_LOCATION = re.compile(r'log_location: "((?:[^"\\]|\\.)*)"')


def _unescape(text: str) -> str:
  """Protobuf text escapes (C style, bytes as octal) back to the text."""
  try:
    return codecs.escape_decode(text.encode("latin-1", "backslashreplace")
                                )[0].decode("utf-8", "replace")
  except ValueError:
    return text


def unwrap_worker_record(record: logging.LogRecord) -> bool:
  """Makes a relayed worker record its worker's own message and location
  (once; the record is shared by every handler)."""
  if record.msg == "Worker: %s" and record.args and not hasattr(
      record, "worker_location"):
    entry = str(record.args[0])
    message = _WORKER_MESSAGE.search(entry)
    location = _WORKER_LOCATION.search(entry)
    record.msg = _unescape(message.group(1)) if message else entry
    record.args = ()
    record.worker_location = _unescape(location.group(1)) if location else ""
  return True


def where(record: logging.LogRecord) -> str:
  """The source file (and line) a record comes from, worker's or driver's."""
  return getattr(record, "worker_location", None) or record.pathname


def short_where(record: logging.LogRecord) -> str:
  located = getattr(record, "worker_location", None)
  if located:
    return "worker " + os.path.basename(located)
  return record.name


class _LogFileFormatter(logging.Formatter):
  def __init__(self):
    super().__init__("%(asctime)s %(levelname)s %(where)s: %(message)s")

  def format(self, record: logging.LogRecord) -> str:
    record.where = short_where(record)
    return super().format(record)


@contextlib.contextmanager
def run_log(uri: str) -> Iterator[str]:
  """Every log record (INFO and up) of the block, in the file at uri (a
  local path, or gs://: written locally and copied there at the end)."""
  remote = not is_local(uri)
  if remote:
    fd, path = tempfile.mkstemp(prefix="dicomstore-", suffix=".log")
    os.close(fd)
  else:
    path = uri
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  handler = logging.FileHandler(path, encoding="utf-8")
  handler.setLevel(logging.INFO)
  handler.addFilter(unwrap_worker_record)
  handler.setFormatter(_LogFileFormatter())
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.INFO)
  root.addHandler(handler)
  logging.captureWarnings(True)   # library warnings: in the log, not shown
  try:
    yield uri
  finally:
    logging.captureWarnings(False)
    root.removeHandler(handler)
    root.setLevel(level)
    handler.close()
    if remote:
      try:
        from apache_beam.io.filesystems import FileSystems
        with open(path, "rb") as f, FileSystems.create(uri) as out:
          shutil.copyfileobj(f, out)
      finally:
        os.unlink(path)


@contextlib.contextmanager
def live_progress(console: Optional[Console],
                  read: Callable[[], Dict[str, int]],
                  describe: Callable[[Dict[str, int], float], str]
                  ) -> Iterator[None]:
  """Shows describe(counts, seconds since start) on the console while the
  block runs: redrawn every LIVE_EVERY_S on a terminal, else a plain line
  every PLAIN_EVERY_S."""
  if console is None:
    yield
    return
  stop = threading.Event()
  start = time.monotonic()
  every = LIVE_EVERY_S if console.live else PLAIN_EVERY_S

  def show():
    while not stop.wait(every):
      console.status(describe(read(), time.monotonic() - start))

  thread = threading.Thread(target=show, daemon=True, name="progress")
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()
    console.end_status()


def megabytes(n: int) -> str:
  return f"{n / 1e6:,.0f} MB" if n >= 10e6 else f"{n / 1e6:,.1f} MB"


def eta(elapsed: float, fraction: float) -> str:
  """' ETA m:ss' from the time so far and the fraction done; '' before
  there is a fraction to go by."""
  if not 0 < fraction < 1:
    return ""
  return f" ETA {duration(elapsed * (1 - fraction) / fraction)}"


class RecentRate:
  """Bytes per second over the last few seconds, as 'x.y MB/s'."""

  def __init__(self, window_s: float = 5.0):
    self.window_s = window_s
    self._samples = []   # (seconds, bytes done), the last few

  def __call__(self, elapsed: float, done: int) -> str:
    self._samples = [s for s in self._samples
                     if elapsed - s[0] < self.window_s]
    self._samples.append((elapsed, done))
    (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
    rate = (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
    return f"{rate / 1e6:,.1f} MB/s"


class StorageProgress:
  """The storage run's progress line, from its counters
  (transforms/progress.py), the ETA first so that a narrow terminal still
  shows it:

    0:42 ETA 0:31 | 5,100 files, 494 MB | 3,210 headers | 3,180 kept,
    12 flagged, 18 rejected | studies 3/6 stored | 240 MB archived, 58 MB/s

  The ETA shows once every input root is listed: the run is taken as two
  halves, reading every header, then storing every file's study (or
  flagging or rejecting it), each measured in files."""

  def __init__(self, listings: int, plan: bool = False):
    self.listings = listings
    self.plan = plan
    self._rate = RecentRate()

  def __call__(self, c: Dict[str, int], elapsed: float) -> str:
    listed = c.get("files_listed", 0)
    done_listing = c.get("listings_done", 0) >= self.listings
    finished = sum(c.get(k, 0) for k in (
        "objects_written", "studies_rows_completed", "studies_skipped",
        "studies_failed", "studies_planned"))
    head = duration(elapsed)
    if done_listing and listed:
      fraction = self._fraction(c, listed)
      if fraction > 0.02:   # too early to tell below that
        head += eta(elapsed, fraction)
    parts = [head,
             f"{listed:,}{'' if done_listing else '+'} files, "
             f"{megabytes(c.get('bytes_listed', 0))}",
             f"{c.get('headers_read', 0):,} headers",
             # Images count as kept when their study is grouped, after every
             # header is read: a 0 until then read as if none were kept.
             (f"{c.get('images_kept', 0):,} kept, "
              if c.get("studies_built") else "")
             + f"{c.get('files_flagged', 0):,} flagged, "
             f"{c.get('files_rejected', 0):,} rejected",
             f"studies {finished:,}/{c.get('studies_built', 0):,} "
             f"{'decided' if self.plan else 'stored'}"]
    if not self.plan:
      archived = c.get("source_bytes_archived", 0)
      parts.append(f"{megabytes(archived)} archived, "
                   f"{self._rate(elapsed, archived)}")
    return " | ".join(parts)

  @staticmethod
  def _fraction(c: Dict[str, int], listed: int) -> float:
    excluded = c.get("files_flagged", 0) + c.get("files_rejected", 0)
    read = min(listed, c.get("headers_read", 0) + excluded)
    stored = min(listed, excluded + c.get("images_finished", 0))
    return (read + stored) / (2 * listed)
