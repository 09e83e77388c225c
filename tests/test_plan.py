"""--plan: a dry run for review. It writes nothing but its report, and a
run on the same unchanged input then does exactly what it said."""
import dataclasses
import shutil
from pathlib import Path

import pytest

from conftest import PROJECT, run_pipeline
from pipeline.run import run
from reruns import add_image_to_study
from transforms.report import read_stored_listing


def _files(folder: Path):
  return sorted(p.relative_to(folder).as_posix()
                for p in folder.rglob("*") if p.is_file())


def _decided(report):
  """What a report says of each study, a plan's and a run's alike."""
  outcome = {"written": "to write", "rows completed": "to complete rows",
             "skipped": "to skip"}
  return sorted((s["uri"], outcome.get(s["outcome"], s["outcome"]),
                 s["instances"], s["input_bytes"], tuple(s["modalities"]))
                for s in report["studies"])


def _excluded(report):
  return {k: [(e["path"], e["reason"]) for e in report[k]]
          for k in ("flagged", "rejected", "failed")}


def _assert_run_did_what_the_plan_said(plan, done):
  assert _decided(plan) == _decided(done)
  assert _excluded(plan) == _excluded(done)
  assert read_stored_listing(plan) == read_stored_listing(done)
  for key in ("images_seen", "kept", "flagged", "rejected", "studies"):
    assert plan["summary"][key] == done["summary"][key], key


@pytest.fixture
def sample_copy(sample, tmp_path):
  """A copy of the sample to change, and what it holds, paths in the copy."""
  root, made = sample
  copy = tmp_path / "input"
  shutil.copytree(root, copy)
  kept = [dataclasses.replace(k, path=copy / k.path.relative_to(root))
          for k in made["kept"]]
  return copy, {**made, "kept": kept}


def test_a_plan_writes_nothing_and_the_run_follows_it(sample_copy, tmp_path):
  root, made = sample_copy
  out = tmp_path / "out"
  plan = run_pipeline(root, out, "--plan")
  assert plan["plan"] and plan["report_path"] == str(out / "metadata" /
                                                    "plan.json")
  assert not (out / "bucket").exists()
  # Only the plan, its listing of what would be stored, and its log.
  assert all(f in ("plan.json", "plan.html") or f.startswith(("stored-", "run-"))
             for f in _files(out / "metadata"))
  assert plan["summary"]["studies_to_write"] == 6
  assert sum(s["instances"] for s in plan["studies"]) == len(made["kept"])

  done = run_pipeline(root, out)
  _assert_run_did_what_the_plan_said(plan, done)

  # A study changed since: the plan rewrites it alone, and so does the run.
  add_image_to_study(made["kept"][0])
  plan = run_pipeline(root, out, "--plan")
  assert sorted(s["outcome"] for s in plan["studies"]) == ["to skip"] * 5 + [
      "to write"]
  done = run_pipeline(root, out)
  _assert_run_did_what_the_plan_said(plan, done)
  assert done["summary"]["objects"] == 1


def test_a_plan_after_a_run_that_lost_its_rows_completes_them(sample_copy,
                                                              tmp_path):
  root, _ = sample_copy
  out = tmp_path / "out"
  run_pipeline(root, out)
  for rows in (out / "metadata").glob("rows-*.json"):
    rows.unlink()
  plan = run_pipeline(root, out, "--plan")
  assert {s["outcome"] for s in plan["studies"]} == {"to complete rows"}
  done = run_pipeline(root, out)
  _assert_run_did_what_the_plan_said(plan, done)
  assert done["summary"]["objects_rows_completed"] == 6


def test_a_plan_on_the_emulators_writes_nothing_there(emulators, sample,
                                                      tmp_path):
  from transforms.bigquery import bigquery_client
  from transforms.gcs import storage_client
  root, _ = sample
  emulators["create_bucket"]("planned")
  argv = [f"--input={root}", "--bucket=gs://planned", "--collection=PLANNED",
          f"--bigquery_project={PROJECT}", "--direct_num_workers=1",
          "--direct_running_mode=in_memory"]
  plan = run([*argv, "--plan", f"--report={tmp_path / 'plan.json'}"])
  assert plan["summary"]["studies_to_write"] == 6
  assert list(storage_client().list_blobs("planned")) == []
  with pytest.raises(Exception, match="Not found|not found|404"):
    bigquery_client(PROJECT).get_dataset(f"{PROJECT}.PLANNED")

  done = run(argv)
  _assert_run_did_what_the_plan_said(plan, done)
  blobs = {b.name: b.generation for b in storage_client().list_blobs("planned")}
  count = f"SELECT COUNT(*) AS n FROM `{PROJECT}.PLANNED.dicom`"
  rows = list(bigquery_client(PROJECT).query(count).result())[0]["n"]
  again = run([*argv, "--plan", f"--report={tmp_path / 'again.json'}"])
  assert again["summary"]["studies_to_skip"] == 6
  assert {b.name: b.generation for b in storage_client().list_blobs(
      "planned")} == blobs
  assert list(bigquery_client(PROJECT).query(count).result())[0]["n"] == rows
