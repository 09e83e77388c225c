"""A study that cannot be stored fails alone, visibly, and leaves nothing."""

from conftest import IN_PROCESS, read_rows
from invariants import check_run
from pipeline.run import main
from transforms.report import read_report


def test_one_failing_study_marks_it_failed_and_the_run_non_zero(sample, tmp_path):
  root, made = sample
  bucket = tmp_path / "bucket"
  key = "Collection/IRB41449/Entity/SUBJ001/SUBJ001_20190110_ACC0101.tar.gz"
  # A non-empty folder where the object belongs: its rename must fail.
  (bucket / key / "occupied").mkdir(parents=True)
  code = main([f"--input={root}", f"--bucket={bucket}", "--collection=IRB41449",
               f"--metadata_output={tmp_path / 'metadata'}", *IN_PROCESS])
  assert code == 1
  report = read_report(str(tmp_path / "metadata" / "report.json"))
  failed = {e["path"] for e in report["failed"]}
  doomed = {str(k.path) for k in made["kept"]
            if k.entity == "SUBJ001" and k.path.parts[-3] == "study1"}
  assert failed == doomed
  assert all("could not be written" in e["reason"] for e in report["failed"])
  rows = read_rows(tmp_path / "metadata")
  assert not [r for r in rows if r["source_path"].startswith("study1/")
              and r["entity_id"] == "SUBJ001"]
  assert report["summary"]["objects"] == 5
  assert not list(bucket.rglob("*.partial"))
  check_run(root, bucket, rows, report)
