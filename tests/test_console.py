"""The operator's console: quiet by default, live progress, the full log in
a file beside the report."""
import io
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pipeline.console as console_module
from pipeline.console import (Console, StorageProgress, _ConsoleHandler,
                              live_progress, run_log)

REPO = Path(__file__).parents[1]

# How Beam's local runner relays a worker's record to the driver.
RELAYED = ('severity: {} timestamp {{   seconds: 1796194271 }} message: "{}" '
           'log_location: "{}" thread: "MainThread" ')


def _relayed(level, message, location):
  severity = {logging.INFO: "INFO", logging.WARNING: "WARN",
              logging.ERROR: "ERROR"}[level]
  return logging.LogRecord(
      "apache_beam.runners.portability.local_job_service", level, __file__,
      1, "Worker: %s", (RELAYED.format(severity, message, location),), None)


def _shown(records, verbose=False):
  out = io.StringIO()
  handler = _ConsoleHandler(Console(stream=out, live=False), verbose)
  for record in records:
    if handler.filter(record):
      handler.emit(record)
  return out.getvalue().splitlines()


def test_the_console_shows_what_needs_attention_and_nothing_of_beam():
  ours = str(REPO / "transforms" / "archive.py") + ":400"
  beams = "/x/site-packages/apache_beam/runners/worker/sdk_worker_main.py:421"
  records = [
      _relayed(logging.INFO, "Python sdk harness exiting.", beams),
      _relayed(logging.WARNING, "No semi_persistent_directory found", beams),
      _relayed(logging.WARNING, "gs://b/x.tar.gz has no readable manifest "
               "(bad): it will be rewritten", ours),
      _relayed(logging.ERROR, "Study 1.2 (K) failed: \\'denied\\'", ours),
      _relayed(logging.ERROR, "Bundle failed", beams),
      logging.LogRecord("apache_beam.io.iobase", logging.INFO, beams, 1,
                        "*** WriteImpl min_shards undef", (), None),
  ]
  assert _shown(records) == [
      "warning: gs://b/x.tar.gz has no readable manifest (bad): it will be "
      "rewritten",
      "error: Study 1.2 (K) failed: 'denied'",
      "error: Bundle failed"]
  verbose = _shown(records, verbose=True)
  assert len(verbose) == 6
  assert verbose[0] == ("INFO worker sdk_worker_main.py:421: Python sdk harness "
                        "exiting.")


def test_the_live_line_is_redrawn_on_a_terminal_and_plain_lines_otherwise(
    monkeypatch):
  monkeypatch.setattr(console_module, "LIVE_EVERY_S", 0.02)
  monkeypatch.setattr(console_module, "PLAIN_EVERY_S", 0.02)
  counts = {"files_listed": 0}

  def read():
    counts["files_listed"] += 1
    return dict(counts)

  for live in (True, False):
    out = io.StringIO()
    console = Console(stream=out, live=live)
    with live_progress(console, read, lambda c, t: f"{c['files_listed']} files"):
      time.sleep(0.2)
    text = out.getvalue()
    if live:
      assert text.count("\r\x1b[2K") >= 3 and "\n" not in text
      assert text.endswith("\r\x1b[2K")   # cleared for what comes next
    else:
      lines = text.splitlines()
      assert len(lines) >= 3 and all(re.fullmatch(r"\d+ files", x)
                                     for x in lines)


def test_the_progress_line_says_how_far_and_how_long():
  describe = StorageProgress(listings=2)
  listing = describe({"files_listed": 900, "bytes_listed": 90_000_000,
                      "listings_done": 1, "headers_read": 100}, 3.0)
  assert listing.startswith("0:03 | 900+ files, 90 MB | 100 headers")
  assert "ETA" not in listing   # the total is not known yet
  # No study grouped yet: no count of kept images (it would read 0).
  assert listing.split(" | ")[3] == "0 flagged, 0 rejected"
  counts = {"files_listed": 1000, "bytes_listed": 100_000_000,
            "listings_done": 2, "headers_read": 990, "files_flagged": 4,
            "files_rejected": 6, "studies_built": 10, "images_kept": 990,
            "objects_written": 4, "studies_skipped": 1,
            "images_finished": 495, "source_bytes_archived": 40_000_000}
  line = describe(counts, 75.0)
  assert line.split(" | ") == [
      "1:15 ETA 0:24", "1,000 files, 100 MB", "990 headers",
      "990 kept, 4 flagged, 6 rejected", "studies 5/10 stored",
      "40 MB archived, 0.0 MB/s"]


def test_the_run_log_keeps_every_record_and_worker_locations(tmp_path):
  path = tmp_path / "logs" / "run-1.log"
  with run_log(str(path)):
    logging.getLogger("apache_beam.x").info("beam info")
    logging.getLogger().handle(_relayed(
        logging.INFO, "Stored gs://b/K.tar.gz (6 images)", "/t/archive.py:9"))
  text = path.read_text()
  assert "INFO apache_beam.x: beam info" in text
  assert "INFO worker archive.py:9: Stored gs://b/K.tar.gz (6 images)" in text


def test_a_run_prints_no_beam_lines_and_logs_everything(sample, tmp_path):
  """As `make run` does it: the console has the start line, the summary
  and nothing of Beam, gRPC or the worker harness; the log beside the
  report has the full log, workers' lines included."""
  root, _ = sample
  done = subprocess.run(
      [sys.executable, "-m", "pipeline", f"--input={root}",
       f"--bucket={tmp_path / 'bucket'}", "--collection=IRB41449",
       f"--metadata_output={tmp_path / 'metadata'}",
       "--direct_num_workers=2"],   # worker processes, whose lines are logged
      capture_output=True, text=True, cwd=REPO)
  assert done.returncode == 0, done.stderr
  out = done.stdout.splitlines()
  assert out[0].startswith("Run ") and " -> " in out[0] and "log " in out[0]
  assert any(line.startswith("Run ") and "(collection IRB41449)" in line
             for line in out[1:])
  assert done.stderr == ""
  for noise in ("INFO", "apache_beam", "Worker:", "grpc", "harness"):
    assert noise not in done.stdout, noise
  logs = list((tmp_path / "metadata").glob("run-*.log"))
  assert len(logs) == 1
  log = logs[0].read_text()
  assert "Python sdk harness exiting." in log
  assert re.search(r"INFO worker archive\.py:\d+: Stored .*\.tar\.gz", log)


@pytest.mark.parametrize("flag", ["--verbose", "--verbose=true"])
def test_verbose_shows_every_line(sample, tmp_path, flag):
  root, _ = sample
  done = subprocess.run(
      [sys.executable, "-m", "pipeline", f"--input={root}",
       f"--bucket={tmp_path / 'bucket'}", "--collection=IRB41449",
       f"--metadata_output={tmp_path / 'metadata'}", flag,
       "--direct_num_workers=1", "--direct_running_mode=in_memory"],
      capture_output=True, text=True, cwd=REPO)
  assert done.returncode == 0, done.stderr
  assert "INFO apache_beam" in done.stderr


def test_counts_reach_the_driver_from_every_process(tmp_path, monkeypatch):
  """Each process writes its counts to its own file in the run's progress
  folder; the driver sums them. A forked worker starts from zero."""
  import os
  from transforms import progress
  monkeypatch.setenv(progress.PROGRESS_DIR_ENV, str(tmp_path))
  count = progress.Count("headers_read")
  count.inc(3)
  child = os.fork()
  if child == 0:   # a worker forked from a process that already counted
    progress.Count("headers_read").inc(2)
    progress._TALLY.flush()   # pylint: disable=protected-access
    os._exit(0)   # pylint: disable=protected-access
  os.waitpid(child, 0)
  progress._TALLY.flush()   # pylint: disable=protected-access
  assert progress.read_progress(str(tmp_path)) == {"headers_read": 5}
  with pytest.raises(ValueError):
    progress.Count("no_such_counter")
