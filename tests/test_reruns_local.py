"""Re-runs into the same local bucket and rows folder: nothing twice,
changes superseded, killed runs recovered."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import IN_PROCESS, read_rows, run_pipeline
from invariants import archive_members
from reruns import add_image_to_study, assert_same_state, current_rows_key
from transforms.current import current_row, newest_per_study
from transforms.report import read_report, read_stored_listing

REPO = Path(__file__).parents[1]


def _current_rows(metadata: Path):
  """Current rows, by the same rule as the BigQuery view."""
  rows = read_rows(metadata)
  current = newest_per_study(map(current_row, rows))
  keep = {(k, img[0], img[5]) for k, imgs in current.items() for img in imgs}
  seen, out = set(), []
  for r in rows:
    key = ((r["entity_id"], r["study_instance_uid"]), r["sop_instance_uid"],
           r["storage"]["written_at"])
    if key in keep and key not in seen:
      seen.add(key)
      out.append(r)
  return out


def _state(out: Path):
  bucket = out / "bucket"
  objects = {p.relative_to(bucket).as_posix(): p.read_bytes()
             for p in bucket.rglob("*.tar.gz") if p.is_file()}
  return objects, current_rows_key(_current_rows(out / "metadata"))


def _mtimes(out: Path):
  return {p: p.stat().st_mtime_ns for p in (out / "bucket").rglob("*.tar.gz")}


def test_second_run_writes_nothing(sample, tmp_path):
  root, made = sample
  first = run_pipeline(root, tmp_path)
  before = _mtimes(tmp_path)
  second = run_pipeline(root, tmp_path)
  assert second["summary"]["objects"] == 0 and second["summary"]["rows"] == 0
  assert second["summary"]["studies_skipped"] == first["summary"]["studies"]
  assert second["summary"]["kept"] == len(made["kept"])   # still accounted for
  # ... each skipped study's files listed with the object they are in.
  listed = read_stored_listing(second)
  assert listed == read_stored_listing(first)
  assert sorted(e["path"] for e in listed) == sorted(
      str(k.path) for k in made["kept"])
  listing = tmp_path / "metadata" / f"stored-{second['run_id']}"
  assert len(list(listing.glob("*.json"))) == second["summary"]["studies_skipped"]
  assert _mtimes(tmp_path) == before
  assert read_rows(tmp_path / "metadata", second["run_id"]) == []


def test_a_changed_study_is_rewritten_and_its_rows_superseded(sample, tmp_path):
  src, made = sample
  root = tmp_path / "input"
  shutil.copytree(src, root)
  run_pipeline(root, tmp_path / "out")
  before = _mtimes(tmp_path / "out")
  instance = next(k for k in made["kept"] if k.entity == "SUBJ002")
  moved = type(instance)(**{**instance.__dict__,
                            "path": root / instance.path.relative_to(src)})
  late = add_image_to_study(moved)
  removed = root / made["kept"][0].path.relative_to(src)   # SUBJ001 study1
  removed.unlink()
  report = run_pipeline(root, tmp_path / "out")
  assert report["summary"]["objects"] == 2       # SUBJ002's and SUBJ001's
  after = _mtimes(tmp_path / "out")
  changed = {p for p in after if after[p] != before.get(p)}
  assert {p.parent.name for p in changed} == {"SUBJ001", "SUBJ002"}
  current = _current_rows(tmp_path / "out" / "metadata")
  sops = [r["sop_instance_uid"] for r in current]
  assert len(sops) == len(set(sops)) == len(made["kept"])  # +1 late, -1 removed
  assert made["kept"][0].sop_uid not in sops
  late_row = next(r for r in current if r["source_path"].endswith("late.dcm"))
  assert late_row["entity_id"] == "SUBJ002"
  # The same end state as one clean run over the changed input.
  clean = tmp_path / "clean"
  run_pipeline(root, clean)
  assert_same_state(_state(tmp_path / "out"), _state(clean))
  assert late.exists()


@pytest.mark.parametrize("crash_at", ["archive_member:3", "object_written:2",
                                      "object_written:6"])
def test_a_killed_run_then_a_rerun_equals_a_clean_run(sample, tmp_path, crash_at):
  root, _ = sample
  out = tmp_path / "out"
  argv = [sys.executable, "-m", "pipeline", f"--input={root}",
          f"--bucket={out / 'bucket'}", "--collection=IRB41449",
          f"--metadata_output={out / 'metadata'}", *IN_PROCESS,
          "--lease_seconds=3"]
  # A killed run cannot delete its header spill: keep it in tmp_path.
  killed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "DICOM_STORAGE_CRASH_AT": crash_at,
                               "TMPDIR": str(tmp_path)})
  assert killed.returncode == -9, killed.stderr[-2000:]
  # Whatever the killed run left under the key schema is complete.
  for obj in (out / "bucket").rglob("*.tar.gz"):
    archive_members(obj)
  in_place = sorted((out / "bucket").rglob("*.tar.gz"))
  # The killed run's lease outlives it by 3 s: the re-run waits for that.
  rerun = subprocess.run(argv + ["--on_busy=wait"], cwd=REPO,
                         capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  # The summary says what the re-run did: objects left in place had only
  # their rows written (the killed run wrote none); the others were written.
  summary = read_report(str(out / "metadata" / "report.json"))["summary"]
  assert summary["objects_rows_completed"] == len(in_place)
  assert summary["objects"] == 6 - len(in_place)
  assert summary["studies_skipped"] == 0 and summary["rows"] == 36
  assert (f": {6 - len(in_place)} objects written (" in rerun.stdout and
          f"{len(in_place)} already in place (rows completed)" in rerun.stdout)
  state = _state(out)
  assert not list((out / "bucket").rglob("*.partial"))
  clean = tmp_path / "clean"
  run_pipeline(root, clean)
  assert_same_state(state, _state(clean))
