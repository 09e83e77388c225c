"""The whole pipeline on the DirectRunner, local folders for bucket and rows."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from conftest import read_rows, run_pipeline
from invariants import check_run


def test_sample_run_keeps_every_promise(sample, tmp_path):
  root, made = sample
  report = run_pipeline(root, tmp_path / "run1")
  rows = read_rows(tmp_path / "run1" / "metadata")
  objects = check_run(root, tmp_path / "run1" / "bucket", rows, report)

  s = report["summary"]
  assert s["kept"] == len(made["kept"]) == len(rows)
  assert s["flagged"] == len(made["flagged"])
  assert s["rejected"] == len(made["bad"])
  assert s["entities"] == 3 and s["studies"] == s["objects"] == 6
  assert s["input_bytes_read"] >= sum(p.path.stat().st_size for p in made["kept"])
  flagged = {e["path"] for e in report["flagged"]}
  assert flagged == {str(p) for p in made["flagged"]}
  assert json.loads((tmp_path / "run1" / "metadata" / "schema.json")
                    .read_text())[0]["name"] == "collection"

  # A second run over the same input writes byte-identical objects.
  run_pipeline(root, tmp_path / "run2")
  again = {p.relative_to(tmp_path / "run2"): p.read_bytes()
           for p in (tmp_path / "run2" / "bucket").rglob("*.tar.gz")}
  first = {p.relative_to(tmp_path / "run1"): d for p, d in objects.items()}
  assert again == first


def test_rows_carry_nested_sequences_and_typed_columns(sample, tmp_path):
  root, made = sample
  run_pipeline(root, tmp_path)
  rows = read_rows(tmp_path / "metadata")
  row = next(r for r in rows if r["sop_instance_uid"] == made["kept"][0].sop_uid)
  header = row["metadata"]   # a nested object in the local row files
  procedure = header["RequestedProcedureCodeSequence"][0]
  assert procedure["CodeValue"] == "24627-0"
  assert procedure["ProcedureCodeSequence"][0]["CodeMeaning"] == "left"
  assert header["ImageType"] == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
  assert header["00091001"] == "protocol-1"
  assert "PixelData" not in header
  assert row["StudyDate"] == "2019-01-10" and row["entity_id"] == "SUBJ001"
  assert row["item_id"] == "ACC0101"
  assert row["storage"]["object"] == (
      "Collection/IRB41449/Entity/SUBJ001/SUBJ001_20190110_ACC0101.tar.gz")


def test_multi_process_run(sample, tmp_path, monkeypatch):
  """Anything that cannot be pickled to a worker fails here, not on Dataflow."""
  root, _ = sample
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  report = run_pipeline(root, tmp_path, "--direct_running_mode=multi_processing",
                        "--direct_num_workers=2")
  check_run(root, tmp_path / "bucket", read_rows(tmp_path / "metadata"), report)
  # Headers waited in the run's own temp folder while grouped; it is gone.
  assert report["summary"]["header_bytes_spilled"] > 0
  assert not list(tmp_path.glob("dicomstore-headers-*"))


def _unseen_tree(root: Path) -> None:
  """Real pydicom files as they ship (their own UIDs), arranged as entities."""
  layout = {
      "P01/a/CT_small.dcm": "CT_small.dcm",
      "P01/a/MR_small.dcm": "MR_small.dcm",
      "P01/b/c/rtdose.dcm": "rtdose.dcm",
      "P02/MR_small_bigendian.dcm": "MR_small_bigendian.dcm",
      "P02/PHI/MR_small_implicit.dcm": "MR_small_implicit.dcm",
      "P02/deep/er/PHI/x/examples_overlay.dcm": "examples_overlay.dcm",
      "P03/waveform_ecg.dcm": "waveform_ecg.dcm",
      "P03/JPEG2000.dcm": "JPEG2000.dcm",
      "P03/README.txt": "README.txt",
      "P03/no_meta.dcm": "no_meta.dcm",
      "P04/zipMR.gz": "zipMR.gz",
  }
  for rel, name in layout.items():
    dest = root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(get_testdata_file(name), dest)
  (root / "P04" / "empty.dcm").write_bytes(b"")
  burned = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
  burned.BurnedInAnnotation = "yes"
  burned.SOPInstanceUID = burned.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
  burned.save_as(root / "P04" / "burned.dcm")


def test_unseen_tree_keeps_the_same_promises(tmp_path):
  root = tmp_path / "input"
  _unseen_tree(root)
  report = run_pipeline(root, tmp_path / "out", collection="UNSEEN_1")
  rows = read_rows(tmp_path / "out" / "metadata")
  check_run(root, tmp_path / "out" / "bucket", rows, report,
            collection="UNSEEN_1")
  flagged = {Path(e["path"]).name: e["reason"] for e in report["flagged"]}
  # pydicom's MR_small variants share their UIDs: the big-endian copy is the
  # same SOP instance as the one in P02/PHI/, so it is flagged as well.
  assert set(flagged) == {"MR_small_implicit.dcm", "examples_overlay.dcm",
                          "burned.dcm", "MR_small_bigendian.dcm"}
  assert flagged["MR_small_bigendian.dcm"].startswith("another copy of SOP")
  assert report["summary"]["kept"] >= 5


def _cli(*args: str, cwd: Path):
  return subprocess.run([sys.executable, "-m", "pipeline", *args],
                        capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("collection", ["IRB-41449", "bad name", ""])
def test_bad_collection_fails_before_work(sample, tmp_path, collection):
  root, _ = sample
  done = _cli(f"--input={root}", f"--bucket={tmp_path / 'b'}",
              f"--collection={collection}", f"--metadata_output={tmp_path / 'm'}",
              cwd=Path(__file__).parents[1])
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1].startswith("error: --collection")
  assert not (tmp_path / "b").exists()


def test_missing_input_root_fails_clearly(tmp_path):
  done = _cli(f"--input={tmp_path / 'nowhere'}", f"--bucket={tmp_path / 'b'}",
              "--collection=C1", f"--metadata_output={tmp_path / 'm'}",
              cwd=Path(__file__).parents[1])
  assert done.returncode == 2
  assert "holds no files (or does not exist)" in done.stderr


def test_the_readme_example_row_is_what_make_run_writes(tmp_path):
  """README "Rows": the example `metadata` (shortened) is a row of the
  sample `make run` builds (seed 0), key for key."""
  from devtools.sample_data import build_sample
  readme = (Path(__file__).parents[1] / "README.md").read_text()
  after = readme.split("One row of `make run`, shortened:", 1)[1]
  example = json.loads(after.split("```json", 1)[1].split("```", 1)[0])
  root = tmp_path / "input"
  build_sample(root)
  run_pipeline(root, tmp_path / "run")
  rows = [r for r in read_rows(tmp_path / "run" / "metadata")
          if r["sop_instance_uid"] == example["SOPInstanceUID"]]
  assert len(rows) == 1
  metadata = json.loads(rows[0]["metadata"]) if isinstance(
      rows[0]["metadata"], str) else rows[0]["metadata"]
  assert {k: metadata.get(k, "(no such key)") for k in example} == example
  assert len(example) >= 10   # the example shows a row, not a fragment
