"""The local runner's worker processes: forked from the warm process, or
Beam's own when no warm process answers; nothing left running after."""
import gc
import os
import socket
import subprocess
import sys

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that

from pipeline import lazy_imports, local_workers
from pipeline.run import local_runner

MULTI_PROCESS = ["--direct_running_mode=multi_processing",
                 "--direct_num_workers=2"]


def _run_on_workers(argv, check):
  """Runs a small pipeline on the local runner; `check` gets the command
  line of the worker process that handled each element (a forked process
  keeps the warm process's). Returns the runner's warm process."""
  def worker_command(_) -> str:
    with open("/proc/self/cmdline", "rb") as f:
      return f"{os.getpid()} " + f.read().replace(b"\0", b" ").decode()

  options = PipelineOptions(argv)
  runner = local_runner(options, argv)
  with beam.Pipeline(runner=runner, options=options) as p:
    commands = (p | beam.Create(range(8)) | beam.Reshuffle()
                | beam.Map(worker_command))
    assert_that(commands, check)
  return runner._warm  # pylint: disable=protected-access


def _gone(warm: local_workers.WarmWorkers) -> bool:
  return (warm._process.poll() is not None  # pylint: disable=protected-access
          and not os.path.exists(os.path.dirname(warm.socket_path)))


def test_workers_come_from_the_warm_process():
  def check(commands):
    assert len(commands) == 8 and all(
        "pipeline.worker_zygote" in c for c in commands), commands
    # Two workers: one forked, and the warm process itself.
    assert len({c.split()[0] for c in commands}) == 2, commands
  warm = _run_on_workers(MULTI_PROCESS, check)
  assert _gone(warm)


def test_without_a_warm_process_beams_own_workers_run(monkeypatch):
  """A warm process that is gone (or never answers) costs only the speed."""
  dead = local_workers.WarmWorkers(2)
  dead.stop()
  monkeypatch.setattr(local_workers, "_early", dead)
  def check(commands):
    assert len(commands) == 8 and all(
        "sdk_worker_main" in c for c in commands), commands
  assert _run_on_workers(MULTI_PROCESS, check) is dead


CORES = local_workers.default_worker_count()


@pytest.mark.parametrize("argv, expected", [
    ([], CORES),
    (["--input", "x", "--runner=DirectRunner"], CORES),
    (["--runner", "DirectRunner", "--direct_running_mode=multi_processing"], CORES),
    (["--direct_num_workers=3"], 3),
    (["--direct_num_workers", "0"], CORES),
    (["--direct_num_workers=x"], 0),
    (["--runner=DataflowRunner"], 0),
    (["--direct_running_mode", "in_memory"], 0),
    (["--direct_running_mode=multi_threading"], 0),
])
def test_local_worker_count(argv, expected):
  assert local_workers.local_worker_count(argv) == expected


def test_a_silent_warm_process_is_given_up_for_beams_own_worker(tmp_path):
  """The attach command waits for a stuck warm process only so long, then
  runs Beam's worker (which here, without a runner, stops at once)."""
  path = str(tmp_path / "silent.sock")
  silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  silent.bind(path)
  silent.listen(1)   # accepts the connection, never answers
  try:
    done = subprocess.run(
        [sys.executable, "-I", "-S", local_workers.ATTACH_SCRIPT, path, "1"],
        capture_output=True, text=True, timeout=120, check=False)
  finally:
    silent.close()
  assert done.returncode != 0
  assert "sdk_worker_main" in done.stderr, done.stderr[-2000:]


def test_the_drivers_unused_cloud_clients_load_at_first_use_only():
  """After Beam and the pipeline are imported with the deferral on, the
  Pub/Sub, Dataflow and BigQuery clients have not run, not even once Beam's
  state cache has weighed a value (it looks into loaded modules only); the
  first attribute looked up loads BigQuery's whole, submodules included.
  The MongoDB libraries left out are not loaded, and Beam's connector
  imports without them."""
  script = """
import sys, types
from pipeline import lazy_imports
lazy_imports.defer_cloud_clients()
lazy_imports.leave_out_unused()
import pipeline.run
from apache_beam.io import mongodbio
from apache_beam.runners.worker import statecache
loaded = lambda n: type(sys.modules[n]) is types.ModuleType
print(statecache.get_deep_size(["a value", {"of": 2}]) > 0)
print([loaded(n) for n in lazy_imports.DEFERRED])
print([sys.modules[n] for n in lazy_imports.UNUSED],
      mongodbio.ReadFromMongoDB.__name__)
try:
  import bson
except ImportError:
  print("no bson")
from google.cloud import bigquery
print(bigquery.Client.__name__, bigquery.table.Table.__name__,
      loaded("google.cloud.bigquery"))
"""
  done = subprocess.run([sys.executable, "-c", script], capture_output=True,
                        text=True, timeout=120,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stderr == ""
  assert done.stdout.splitlines() == [
      "True", "[False, False, False]",
      "[None, None, None, None] ReadFromMongoDB",
      "no bson", "Client Table True"]


def test_the_warm_process_defers_only_the_clients_no_worker_uses():
  """Workers use BigQuery's client from their threads (where a deferred
  import is not safe): the warm process imports it whole, and leaves the
  Pub/Sub and Dataflow API clients, which no worker uses, unloaded."""
  script = """
import sys, types
from pipeline import lazy_imports, worker_zygote
worker_zygote.import_warm_modules()
loaded = lambda n: type(sys.modules[n]) is types.ModuleType
print([loaded(n) for n in lazy_imports.DEFERRED])
print([sys.modules[n] for n in lazy_imports.UNUSED])
"""
  done = subprocess.run([sys.executable, "-c", script], capture_output=True,
                        text=True, timeout=120,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stderr == ""
  assert done.stdout.splitlines() == ["[False, False, True]",
                                      "[None, None, None, None]"]


def test_only_a_local_run_defers_them():
  assert local_workers.runs_locally(["--input=x"])
  assert local_workers.runs_locally(["--runner=DirectRunner"])
  assert not local_workers.runs_locally(["--runner=DataflowRunner"])


def test_imports_run_without_collection_and_stay_out_of_later_ones():
  assert gc.isenabled()
  frozen = gc.get_freeze_count()
  with lazy_imports.without_collection():
    assert not gc.isenabled()
    made = [[i] for i in range(1000)]
  assert gc.isenabled()
  assert gc.get_freeze_count() >= frozen + len(made)
  gc.unfreeze()   # this test's process goes on: as it was
