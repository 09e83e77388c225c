"""Safe re-runs against the emulators: a second run writes nothing, a
changed study is rewritten and its rows superseded, and a run killed at any
point then re-run ends where one clean run ends."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import IN_PROCESS, PROJECT
from pipeline.run import run
from reruns import (add_image_to_study, assert_same_state, current_rows_key,
                    wait_for_lease_to_expire)
from test_cloud import query
from test_incremental import (_add_file, _bigger, _modify_file, _move_study,
                              _remove_file)
from transforms.gcs import storage_client

REPO = Path(__file__).parents[1]


def _argv(root: Path, name: str):
  return [f"--input={root}", f"--bucket=gs://{name}", "--collection=IRB41449",
          f"--bigquery_table={PROJECT}:{name.upper()}.dicom", *IN_PROCESS]


def _blobs(bucket: str):
  return {b.name: b for b in storage_client().list_blobs(bucket)
          if b.name.startswith("Collection/")}


def _state(name: str):
  objects = {k: b.download_as_bytes() for k, b in _blobs(name).items()}
  rows = query(f"SELECT * FROM `{PROJECT}.{name.upper()}.dicom_current`")
  return objects, current_rows_key(rows)


def _all_rows(name: str) -> int:
  return query(f"SELECT COUNT(*) AS n FROM `{PROJECT}.{name.upper()}.dicom`")[0]["n"]


@pytest.fixture(scope="module")
def clean(emulators, sample):
  root, _ = sample
  emulators["create_bucket"]("clean")
  run(_argv(root, "clean"))
  return _state("clean")


def test_second_run_writes_no_objects_and_no_rows(emulators, sample, clean):
  root, made = sample
  emulators["create_bucket"]("twice")
  run(_argv(root, "twice"))
  generations = {k: b.generation for k, b in _blobs("twice").items()}
  rows = _all_rows("twice")
  report = run(_argv(root, "twice"))
  assert report["summary"]["objects"] == 0 and report["summary"]["rows"] == 0
  assert report["summary"]["studies_skipped"] == 6
  assert {k: b.generation for k, b in _blobs("twice").items()} == generations
  assert _all_rows("twice") == rows == len(made["kept"])
  assert_same_state(_state("twice"), clean)


def test_changed_study_rewrites_only_its_object(emulators, sample, tmp_path):
  src, made = sample
  root = tmp_path / "input"
  shutil.copytree(src, root)
  emulators["create_bucket"]("changed")
  run(_argv(root, "changed"))
  before = {k: b.generation for k, b in _blobs("changed").items()}
  instance = next(k for k in made["kept"] if k.entity == "SUBJ003")
  moved = type(instance)(**{**instance.__dict__,
                            "path": root / instance.path.relative_to(src)})
  add_image_to_study(moved)
  report = run(_argv(root, "changed"))
  assert report["summary"]["objects"] == 1
  after = {k: b.generation for k, b in _blobs("changed").items()}
  changed = [k for k in after if after[k] != before[k]]
  assert len(changed) == 1 and "/SUBJ003/" in changed[0]
  current = query(f"SELECT sop_instance_uid, storage.generation AS g, "
                  f"storage.object AS o FROM `{PROJECT}.CHANGED.dicom_current`")
  sops = [r["sop_instance_uid"] for r in current]
  assert len(sops) == len(set(sops)) == len(made["kept"]) + 1
  for r in current:
    assert r["g"] == after[r["o"]]       # every current row: current object
  # The superseded rows are still in the table, just not current.
  assert _all_rows("changed") > len(sops)


@pytest.mark.parametrize("crash_at", ["archive_member:4", "object_written:1",
                                      "object_written:6"])
def test_killed_run_then_rerun_equals_clean_run(emulators, sample, clean,
                                                crash_at, tmp_path):
  root, _ = sample
  name = "kill" + crash_at.replace("_", "").replace(":", "")
  emulators["create_bucket"](name)
  argv = [sys.executable, "-m", "pipeline", *_argv(root, name),
          "--lease_seconds=3"]
  # A killed run cannot delete its header spill: keep it in tmp_path.
  killed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "DICOM_STORAGE_CRASH_AT": crash_at,
                               "TMPDIR": str(tmp_path)})
  assert killed.returncode == -9, killed.stderr[-3000:]
  for blob in _blobs(name).values():   # nothing partial is visible
    with tarfile.open(fileobj=io.BytesIO(blob.download_as_bytes()),
                      mode="r:gz") as archive:
      assert archive.getnames()[-1].endswith("/manifest.json")
  # The killed run's lease outlives it by 3 s: the re-run waits for that.
  rerun = subprocess.run(argv + ["--on_busy=wait"], cwd=REPO,
                         capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert_same_state(_state(name), clean)


def test_nothing_changed_reads_nothing_and_a_change_is_read(emulators, sample,
                                                           tmp_path):
  """On Cloud Storage input (listed with generations) and BigQuery rows:
  an unchanged entity is not read; a changed file makes its entity read,
  and the result is a clean run's."""
  src, made = sample
  emulators["create_bucket"]("incr-in")
  emulators["create_bucket"]("incr")
  upload = lambda: [storage_client().bucket("incr-in").blob(  # noqa: E731
      f"in/{p.relative_to(src).as_posix()}").upload_from_filename(str(p))
                    for p in sorted(src.rglob("*")) if p.is_file()]
  upload()
  argv = ["--input=gs://incr-in/in", "--bucket=gs://incr",
          "--collection=IRB41449", f"--bigquery_table={PROJECT}:INCR.dicom",
          *IN_PROCESS]
  run(argv)
  generations = {k: b.generation for k, b in _blobs("incr").items()}
  again = run(argv)
  s = again["summary"]
  assert s["input_bytes_read"] == 0 and s["files_not_read"] == 44
  assert s["objects"] == 0 and s["rows"] == 0
  assert {k: b.generation for k, b in _blobs("incr").items()} == generations
  # The same bytes uploaded again: a new generation, so its entity is read
  # (and its objects, unchanged, are skipped).
  one = made["kept"][0]
  storage_client().bucket("incr-in").blob(
      f"in/{one.path.relative_to(src).as_posix()}").upload_from_filename(
          str(one.path))
  third = run(argv)
  entity_files = sum(1 for p in (src / one.entity).rglob("*") if p.is_file())
  assert third["summary"]["files_not_read"] == 44 - entity_files
  assert third["summary"]["objects"] == 0
  assert_same_state(_state("incr"), _state_of_clean(emulators, src))


def _state_of_clean(emulators, src):
  emulators["create_bucket"]("incrclean")
  run([f"--input={src}", "--bucket=gs://incrclean", "--collection=IRB41449",
       f"--bigquery_table={PROJECT}:INCRCLEAN.dicom", *IN_PROCESS])
  return _state("incrclean")


def test_the_lease_on_cloud_storage(emulators, sample):
  """One holder at a time, by generation preconditions; an expired lease is
  taken over; a run finding the lease held exits 3."""
  from transforms.lease import CollectionBusy, Lease
  root, _ = sample
  emulators["create_bucket"]("leased")
  first = Lease("gs://leased", "IRB41449", "run-a", seconds=3)
  first.acquire()
  with pytest.raises(CollectionBusy, match="run run-a on "):
    Lease("gs://leased", "IRB41449", "run-b", seconds=3).acquire()
  done = subprocess.run(
      [sys.executable, "-m", "pipeline", *_argv(root, "leased")], cwd=REPO,
      capture_output=True, text=True)
  assert done.returncode == 3 and "collection busy: run run-a" in done.stderr
  # Killed: no more renewals, nothing released. After 3 s it is taken over.
  first._stop.set()  # pylint: disable=protected-access
  time.sleep(3.2)
  second = Lease("gs://leased", "IRB41449", "run-b", seconds=3)
  second.acquire()
  second.release()
  assert storage_client().bucket("leased").get_blob(
      "Runs/IRB41449/lease.json") is None


@pytest.mark.parametrize("change", [_add_file, _modify_file, _remove_file,
                                    _move_study])
def test_a_change_is_read_as_a_full_scan_reads_it(emulators, sample, tmp_path,
                                                  change):
  """Rows in BigQuery, objects and ledger on Cloud Storage: a file added,
  modified or removed, or a study moved to a new entity folder, makes only
  its entities read, and the result is a --full_scan's. It is a clean run's
  of the changed input too, but for the move: nothing is ever deleted, so
  the moved study's old object and its rows stay under the old entity."""
  src, made = sample
  root = tmp_path / "input"
  shutil.copytree(src, root)
  name = "chg" + change.__name__.strip("_").split("_")[0]
  for bucket in (name, name + "full"):
    emulators["create_bucket"](bucket)
    run(_argv(root, bucket))
  change(root, made)
  again = run(_argv(root, name))
  assert 0 < again["summary"]["files_not_read"] < 44
  full = run([*_argv(root, name + "full"), "--full_scan"])
  assert full["summary"]["files_not_read"] == 0
  assert_same_state(_state(name), _state(name + "full"))
  if change is not _move_study:
    emulators["create_bucket"](name + "clean")
    run(_argv(root, name + "clean"))
    assert_same_state(_state(name), _state(name + "clean"))


MULTI_PROCESS = ["--direct_num_workers=2",
                 "--direct_running_mode=multi_processing"]


def _cli(root: Path, name: str, *extra: str, env=None):
  return subprocess.Popen(
      [sys.executable, "-m", "pipeline", *_argv(root, name), *extra],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, **(env or {})})


def _lease_blob(name: str):
  return storage_client().bucket(name).get_blob("Runs/IRB41449/lease.json")


def test_runs_started_together_one_stores_the_other_exits_3_or_waits(
    emulators, sample, tmp_path):
  """Two runs started together on one Cloud Storage collection: one stores,
  the other exits 3; a run with --on_busy=wait waits for the lease, then
  finds everything stored."""
  from transforms.lease import Lease
  root = _bigger(sample[0], tmp_path / "input")
  emulators["create_bucket"]("together")
  runs = [_cli(root, "together", *MULTI_PROCESS) for _ in range(2)]
  results = [(r.wait(timeout=300), r.communicate()) for r in runs]
  assert sorted(code for code, _ in results) == [0, 3], [
      err[-1500:] for _, (_, err) in results]
  busy = next(err for code, (_, err) in results if code == 3)
  assert busy.strip().splitlines()[-1].startswith(
      "error: collection busy: run ")
  assert _lease_blob("together") is None
  held = Lease("gs://together", "IRB41449", "another-run", seconds=60)
  held.acquire()
  report = tmp_path / "waited.json"
  waiting = _cli(root, "together", "--on_busy=wait", f"--report={report}")
  time.sleep(3)
  assert waiting.poll() is None   # still waiting
  held.release()
  _, err = waiting.communicate(timeout=300)
  assert waiting.returncode == 0, err[-1500:]
  s = json.loads(report.read_text())["summary"]
  assert s["objects"] == 0 and s["input_bytes_read"] == 0
  assert s["studies_skipped"] == s["studies"] > 0


def test_a_killed_runs_lease_expires_and_the_next_run_proceeds_on_gcs(
    emulators, sample, clean, tmp_path):
  root, _ = sample
  emulators["create_bucket"]("killed")
  killed = _cli(root, "killed", "--lease_seconds=8",
                env={"DICOM_STORAGE_CRASH_AT": "object_written:2",
                     "TMPDIR": str(tmp_path)})
  killed.communicate(timeout=300)
  assert killed.returncode == -9
  left = json.loads(_lease_blob("killed").download_as_text())  # left behind
  busy = _cli(root, "killed")
  busy.communicate(timeout=120)
  assert busy.returncode == 3   # not expired yet
  wait_for_lease_to_expire(left)
  after = _cli(root, "killed")
  _, err = after.communicate(timeout=300)
  assert after.returncode == 0, err[-1500:]
  assert _lease_blob("killed") is None
  assert_same_state(_state("killed"), clean)
