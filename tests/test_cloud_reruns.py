"""Safe re-runs against the emulators: a second run writes nothing, a
changed study is rewritten and its rows superseded, and a run killed at any
point then re-run ends where one clean run ends."""
from __future__ import annotations

import io
import os
import shutil
import tarfile
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import IN_PROCESS, PROJECT
from pipeline.run import run
from reruns import add_image_to_study, assert_same_state, current_rows_key
from test_cloud import query
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
  argv = [sys.executable, "-m", "pipeline", *_argv(root, name)]
  # A killed run cannot delete its header spill: keep it in tmp_path.
  killed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "DICOM_STORAGE_CRASH_AT": crash_at,
                               "TMPDIR": str(tmp_path)})
  assert killed.returncode == -9, killed.stderr[-3000:]
  for blob in _blobs(name).values():   # nothing partial is visible
    with tarfile.open(fileobj=io.BytesIO(blob.download_as_bytes()),
                      mode="r:gz") as archive:
      assert archive.getnames()[-1].endswith("/manifest.json")
  rerun = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert_same_state(_state(name), clean)
