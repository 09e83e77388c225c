"""python -m pipeline.export from local rows and a local bucket: cohorts
by a condition and by a query, files identical to the originals, a
manifest, resumable, and every image that cannot be had named."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import check_export_folder, export_manifest, run_pipeline
from pipeline.export import main

REPO = Path(__file__).parents[1]
QUERIES = REPO / "queries"
# Any item of a nested sequence has the code: the researcher's condition.
PROCEDURE = ("EXISTS (SELECT 1 FROM UNNEST(JSON_QUERY_ARRAY(metadata, "
             "'$.RequestedProcedureCodeSequence')) AS p WHERE "
             "JSON_VALUE(p, '$.CodeValue') = @code)")


@pytest.fixture(scope="module")
def stored(sample, tmp_path_factory):
  """A run of the sample, to export from (not changed by these tests)."""
  root, made = sample
  out = tmp_path_factory.mktemp("export_source")
  run_pipeline(root, out)
  return out / "metadata", made


def _export(metadata, out, *args):
  return main([f"--metadata_output={metadata}", f"--out={out}", *args])


def _in(made, entity_study=None, series=None):
  return [k for k in made["kept"]
          if (entity_study is None or k.path.parts[-3] == entity_study)
          and (series is None or k.path.parts[-2] == series)]


def test_a_cohort_by_modality_and_a_nested_condition(stored, tmp_path, capsys):
  metadata, made = stored
  ct = tmp_path / "ct"
  assert _export(metadata, ct, "--where",
                 "Modality = 'CT' AND JSON_VALUE(metadata, "
                 "'$.BodyPartExamined') = 'CHEST'") == 0
  chest_ct = {m["sop_instance_uid"] for m in export_manifest(ct)}
  check_export_folder(ct, [k for k in made["kept"] if k.sop_uid in chest_ct])
  assert len(chest_ct) == 6   # CT sources in the sample's chest studies
  nested = tmp_path / "nested"
  assert _export(metadata, nested, "--where", PROCEDURE,
                 "--param", "code=36643-5") == 0
  check_export_folder(nested, _in(made, entity_study="study2"))
  assert "18 written" in capsys.readouterr().out


def test_a_cohort_by_a_query_file_in_the_member_layout(stored, tmp_path):
  metadata, made = stored
  out = tmp_path / "localizers"
  assert _export(metadata, out, f"--sql=@{QUERIES / 'localizer_images.sql'}",
                 "--layout=member") == 0
  check_export_folder(out, _in(made, series="series1"), layout="member")


def test_a_second_export_writes_nothing(stored, tmp_path, capsys):
  metadata, made = stored
  out = tmp_path / "again"
  assert _export(metadata, out, "--where", "TRUE") == 0
  before = {p: p.stat().st_mtime_ns for p in out.rglob("*.dcm")}
  capsys.readouterr()
  assert _export(metadata, out, "--where", "TRUE") == 0
  said = capsys.readouterr().out
  assert "0 written, 36 already there" in said and "in 0 requests" in said
  assert {p: p.stat().st_mtime_ns for p in out.rglob("*.dcm")} == before
  check_export_folder(out, made["kept"])


def test_a_killed_export_is_completed_by_running_it_again(stored, tmp_path):
  metadata, made = stored
  out = tmp_path / "killed"
  argv = [sys.executable, "-m", "pipeline.export",
          f"--metadata_output={metadata}", "--where=TRUE", f"--out={out}",
          "--workers=2"]
  killed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ,
                               "DICOM_STORAGE_CRASH_AT": "export_partial:5"})
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert list(out.rglob("*.exporting"))   # cut short mid-way
  again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
  assert again.returncode == 0, again.stderr
  assert not list(out.rglob("*.exporting"))
  clean = tmp_path / "clean"
  assert _export(metadata, clean, "--where", "TRUE") == 0
  check_export_folder(out, made["kept"])
  assert (out / "manifest.csv").read_text() == (
      clean / "manifest.csv").read_text()


def test_a_corrupt_member_and_a_missing_object_are_named(sample, tmp_path,
                                                        capsys):
  root, made = sample
  run = run_pipeline(root, tmp_path / "run")
  metadata = tmp_path / "run" / "metadata"
  objects = sorted((tmp_path / "run" / "bucket").rglob("*.tar.gz"))
  corrupt, gone = objects[0], objects[1]
  # One byte flipped inside the first image's member of one object.
  data = bytearray(corrupt.read_bytes())
  data[400] ^= 0xFF
  corrupt.write_bytes(bytes(data))
  gone.unlink()
  out = tmp_path / "cohort"
  assert _export(metadata, out, "--where", "TRUE") == 1
  err = capsys.readouterr().err
  assert "error: 7 images could not be had" in err
  with open(out / "failed.csv", newline="") as f:
    failed = list(csv.DictReader(f))
  by_object = {}
  for f in failed:
    by_object.setdefault(f["object_uri"], []).append(f["reason"])
  assert len(by_object[str(gone)]) == 6
  assert all("is gone" in r for r in by_object[str(gone)])
  assert len(by_object[str(corrupt)]) == 1
  assert ("SHA-256 mismatch" in by_object[str(corrupt)][0]
          or "gzip" in by_object[str(corrupt)][0])
  failed_sops = {f["sop_instance_uid"] for f in failed}
  check_export_folder(out, [k for k in made["kept"] if k.sop_uid not in failed_sops])
  assert run["summary"]["kept"] == 36


def test_bad_options_exit_2_with_one_line(stored, tmp_path, capsys):
  metadata, _ = stored
  assert _export(metadata, tmp_path / "x", "--where", "NoSuchColumn = 1") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ")
  with pytest.raises(SystemExit) as exit_:
    main(["--out=x", "--where=TRUE"])   # where the rows are is required
  assert exit_.value.code == 2
