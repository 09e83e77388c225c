"""Scheduled runs: unchanged entity folders are not read again, a change
is handled as a full run handles it, and runs that overlap never trip over
each other (the collection's lease)."""
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from conftest import IN_PROCESS, read_rows, run_pipeline
from devtools.sample_data import fresh_uid
from reruns import (add_image_to_study, current_rows_key,
                    wait_for_lease_to_expire)
from test_reruns_local import _current_rows
from transforms.report import read_stored_listing

REPO = Path(__file__).parents[1]


@pytest.fixture
def changing(sample, tmp_path):
  """A copy of the sample, stored once, to change."""
  root, made = sample
  copy_root = tmp_path / "input"
  shutil.copytree(root, copy_root)
  first = run_pipeline(copy_root, tmp_path / "out")
  return copy_root, made, tmp_path / "out", first


def _mtimes(out: Path):
  return {p: p.stat().st_mtime_ns for p in (out / "bucket").rglob("*.tar.gz")}


def test_nothing_changed_nothing_read_nothing_written(changing):
  root, made, out, first = changing
  before = _mtimes(out)
  again = run_pipeline(root, out)
  s = again["summary"]
  assert s["input_bytes_read"] == 0 and s["header_bytes_spilled"] == 0
  assert s["files_not_read"] == 44 and s["studies_not_read"] == 6
  assert s["objects"] == 0 and s["rows"] == 0 and s["studies_skipped"] == 6
  assert _mtimes(out) == before
  # Every file still has its outcome: stored where it was, or the recorded
  # reason, marked as not read again.
  assert read_stored_listing(again) == read_stored_listing(first)
  for status in ("flagged", "rejected"):
    assert [(e["path"], e["reason"]) for e in again[status]] == [
        (e["path"], e["reason"]) for e in first[status]]
    assert all(e["not_reread_since"] == first["run_id"] for e in again[status])
  # --full_scan reads everything again (and, the objects unchanged, skips).
  full = run_pipeline(root, out, "--full_scan")
  assert full["summary"]["files_not_read"] == 0
  assert full["summary"]["input_bytes_read"] > 0
  assert full["summary"]["studies_skipped"] == 6


def _comparable(report: dict) -> dict:
  """A report without what differs between any two runs."""
  same = {k: v for k, v in report.items()
          if k not in ("run_id", "stored_files", "report_page", "log")}
  same["summary"] = {k: v for k, v in report["summary"].items()
                     if k != "seconds"}
  same["stored"] = read_stored_listing(report)
  return same


def _ledgers(out: Path):
  return sorted((out / "bucket" / "Runs" / "IRB41449").glob("excluded-*"))


def test_an_unchanged_input_is_decided_before_the_graph_as_the_graph_would(
    changing, monkeypatch):
  """A local run whose whole input is unchanged writes its report and ledger
  without running the graph (pipeline/run.input_as_recorded); the graph,
  made to decide the same input, writes the same."""
  import pipeline.run
  root, _, out, first = changing
  before = _mtimes(out)
  rows_files = sorted((out / "metadata").glob("rows-*.json"))
  decided_first = run_pipeline(root, out)
  ledger = _ledgers(out)[-1].read_text()
  with monkeypatch.context() as m:
    m.setattr(pipeline.run, "input_as_recorded", lambda *_: None)
    by_graph = run_pipeline(root, out)
  assert _comparable(decided_first) == _comparable(by_graph)
  assert _ledgers(out)[-1].read_text() == ledger
  assert ledger.count("\n") == len(first["flagged"]) + len(first["rejected"])
  assert _mtimes(out) == before
  # The graph wrote its (empty) row file; the decision before it, none.
  assert len(sorted((out / "metadata").glob("rows-*.json"))) == len(
      rows_files) + 1
  assert not list((out / "metadata").glob(
      f"rows-{decided_first['run_id']}-*"))


def test_a_large_input_is_decided_by_the_graph_alike(changing, monkeypatch):
  """Over DRIVER_DECISION_FILES files the driver does not list the input
  or hold its rows: the graph decides, and nothing changed is still
  nothing read (the graph writes its empty row file)."""
  import pipeline.run
  root, _, out, first = changing
  monkeypatch.setattr(pipeline.run, "DRIVER_DECISION_FILES", 10)
  again = run_pipeline(root, out)
  s = again["summary"]
  assert s["input_bytes_read"] == 0 and s["files_not_read"] == 44
  assert s["objects"] == 0 and s["studies_skipped"] == 6
  assert list((out / "metadata").glob(f"rows-{again['run_id']}-*"))
  assert read_stored_listing(again) == read_stored_listing(first)


def test_a_plan_of_an_unchanged_input_skips_everything_and_writes_no_ledger(
    changing):
  root, _, out, _ = changing
  ledgers = _ledgers(out)
  plan = run_pipeline(root, out, "--plan", f"--report={out / 'plan.json'}")
  s = plan["summary"]
  assert s["studies_to_skip"] == 6 and s["studies_to_write"] == 0
  assert s["files_not_read"] == 44 and s["input_bytes_read"] == 0
  assert {st["outcome"] for st in plan["studies"]} == {"to skip"}
  assert _ledgers(out) == ledgers


def _add_file(root, made):
  add_image_to_study(dataclass_in(made["kept"][0], root))


def _modify_file(root, made):
  path = dataclass_in(made["kept"][7], root).path
  ds = pydicom.dcmread(path)
  ds.StudyDescription = "re-exported with a new description"
  ds.save_as(path, enforce_file_format=True)


def _remove_file(root, made):
  dataclass_in(made["kept"][13], root).path.unlink()


def _move_study(root, made):
  """SUBJ003's second study moves to a new entity folder."""
  study = dataclass_in(made["kept"][-1], root).path.parents[1]
  target = root / "SUBJ004" / study.name
  target.parent.mkdir()
  shutil.move(str(study), str(target))


def dataclass_in(instance, root):
  """A sample instance, at its place in the copy."""
  clone = copy.copy(instance)
  clone.path = root / Path(*instance.path.parts[-4:])
  return clone


def _state(out: Path):
  bucket = out / "bucket"
  objects = {p.relative_to(bucket).as_posix(): p.read_bytes()
             for p in bucket.rglob("*.tar.gz")}
  return objects, current_rows_key(_current_rows(out / "metadata"))


@pytest.mark.parametrize("change", [_add_file, _modify_file, _remove_file,
                                    _move_study])
def test_a_change_is_handled_as_a_full_scan_handles_it(sample, tmp_path,
                                                       change):
  root, made = sample
  results = {}
  for mode in ("incremental", "full"):
    work = tmp_path / mode
    shutil.copytree(root, work / "input")
    run_pipeline(work / "input", work / "out")
    change(work / "input", made)
    extra = ["--full_scan"] if mode == "full" else []
    results[mode] = (run_pipeline(work / "input", work / "out", *extra),
                     _state(work / "out"))
  (incremental, state), (full, full_state) = results["incremental"], results[
      "full"]
  assert state == full_state
  for key in ("objects", "studies", "kept", "flagged", "rejected",
              "objects_rows_completed"):
    assert incremental["summary"][key] == full["summary"][key], key
  # Only the changed entity was read: the others' files were not.
  assert 0 < incremental["summary"]["files_not_read"] < 44
  assert incremental["summary"]["input_bytes_read"] < full["summary"][
      "input_bytes_read"]


def test_a_new_entity_alone_is_read(changing):
  root, made, out, _ = changing
  new = root / "SUBJ009" / "study1"
  new.mkdir(parents=True)
  source = pydicom.dcmread(made["kept"][0].path)
  for i in range(3):
    ds = copy.deepcopy(source)
    ds.StudyInstanceUID = fresh_uid("new-entity")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = fresh_uid(
        "new-entity", i)
    ds.save_as(new / f"i{i}.dcm", enforce_file_format=True)
  again = run_pipeline(root, out)
  s = again["summary"]
  new_bytes = sum(p.stat().st_size for p in new.iterdir())
  assert s["objects"] == 1 and s["files_not_read"] == 44
  assert new_bytes <= s["input_bytes_read"] < new_bytes * 2


# --- runs that overlap -----------------------------------------------------

def _cli(root, out, *extra, env=None):
  return subprocess.Popen(
      [sys.executable, "-m", "pipeline", f"--input={root}",
       f"--bucket={out / 'bucket'}", "--collection=IRB41449",
       f"--metadata_output={out / 'metadata'}", *IN_PROCESS, *extra],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, **(env or {})})


def _lease(out: Path) -> Path:
  return out / "bucket" / "Runs" / "IRB41449" / "lease.json"


def _wait_for(path: Path, process, limit: float = 60):
  deadline = time.monotonic() + limit
  while not path.exists():
    assert process.poll() is None, process.communicate()
    assert time.monotonic() < deadline
    time.sleep(0.05)


def _bigger(sample_root: Path, target: Path, copies: int = 5) -> Path:
  """The sample five times over (each entity under new names): enough
  files for worker processes and a run of a few seconds."""
  for n in range(copies):
    for entity in sample_root.iterdir():
      shutil.copytree(entity, target / f"{entity.name}_{n}")
  return target


def test_two_runs_started_together_one_stores_the_other_exits_3(sample,
                                                                 tmp_path):
  root = _bigger(sample[0], tmp_path / "input")
  out = tmp_path / "out"
  runs = [_cli(root, out, "--direct_num_workers=2",
               "--direct_running_mode=multi_processing") for _ in range(2)]
  results = [(r.wait(timeout=300), r.communicate()) for r in runs]
  codes = sorted(code for code, _ in results)
  assert codes == [0, 3], [err[-1500:] for _, (_, err) in results]
  busy = next(err for code, (_, err) in results if code == 3)
  assert busy.strip().splitlines()[-1].startswith(
      "error: collection busy: run ")
  assert not _lease(out).exists()


def test_a_run_finding_the_lease_held_exits_or_waits(sample, tmp_path):
  from transforms.lease import Lease
  root, made = sample
  out = tmp_path / "out"
  held = Lease(str(out / "bucket"), "IRB41449", "another-run", seconds=60)
  held.acquire()
  busy = _cli(root, out)
  _, err = busy.communicate(timeout=120)
  assert busy.returncode == 3
  assert err.strip().splitlines()[-1].startswith(
      "error: collection busy: run another-run on ")
  assert not (out / "metadata").exists()   # nothing done
  # With --on_busy=wait, it waits for the lease, then runs.
  waiting = _cli(root, out, "--on_busy=wait")
  time.sleep(3)
  assert waiting.poll() is None   # still waiting
  held.release()
  out_text, err = waiting.communicate(timeout=300)
  assert waiting.returncode == 0, err
  assert len(read_rows(out / "metadata")) == len(made["kept"])


def test_a_killed_runs_lease_expires_and_the_next_run_proceeds(sample,
                                                              tmp_path):
  root, made = sample
  out = tmp_path / "out"
  killed = _cli(root, out, "--lease_seconds=8",
                env={"DICOM_STORAGE_CRASH_AT": "object_written:2",
                     "TMPDIR": str(tmp_path)})
  killed.communicate(timeout=300)
  assert killed.returncode == -9
  left = json.loads(_lease(out).read_text())   # left behind
  busy = _cli(root, out)
  busy.communicate(timeout=120)
  assert busy.returncode == 3   # not expired yet
  wait_for_lease_to_expire(left)
  after = _cli(root, out)
  out_text, err = after.communicate(timeout=300)
  assert after.returncode == 0, err
  assert not _lease(out).exists()
  assert not list((out / "bucket").rglob("*.partial"))
  clean = tmp_path / "clean"
  run_pipeline(root, clean)
  assert _state(out) == _state(clean)


def test_an_entitys_files_are_read_in_batches_of_equal_size():
  from transforms.shortcut import even_batches
  sizes = lambda n, most: [len(b) for b in even_batches(list(range(n)), most)]
  assert sizes(100, 64) == [50, 50]
  assert sizes(129, 64) == [43, 43, 43]
  assert sizes(64, 64) == [64] and sizes(3, 64) == [3] and sizes(0, 64) == []
  batches = list(even_batches(list(range(1000)), 64))
  assert [i for b in batches for i in b] == list(range(1000))
  assert max(map(len, batches)) <= 64 and len(batches) == 16
