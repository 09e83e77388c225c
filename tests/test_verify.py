"""python -m pipeline.verify on a local bucket and local rows: from a
clean run, each kind of damage is found and named, and nothing else."""
import json
import shutil
from pathlib import Path

import pytest

from conftest import read_rows, run_pipeline
from pipeline.verify import main
from invariants import archive_holding
from transforms.verify import sampled


@pytest.fixture
def collection(sample, tmp_path):
  """A clean run of the sample, of this test's own."""
  root, made = sample
  out = tmp_path / "run"
  run_pipeline(root, out)
  return root, made, out


def verify(out: Path, tmp_path: Path, *extra: str):
  """(exit status, the report)."""
  report = tmp_path / "verify" / "verify.json"
  code = main([f"--bucket={out / 'bucket'}", "--collection=IRB41449",
               f"--metadata_output={out / 'metadata'}", f"--report={report}",
               *extra])
  return code, json.loads(report.read_text())


def _problems(report, kind):
  return report["problems"][kind]


def _objects(out: Path):
  return sorted((out / "bucket").rglob("*.tar.gz"))


def test_a_clean_collection_holds(collection, tmp_path, capsys):
  root, made, out = collection
  code, report = verify(out, tmp_path, "--read_data", f"--input={root}")
  assert code == 0, capsys.readouterr().err
  s = report["summary"]
  assert s["problems"] == 0 and s["objects_checked"] == 6
  assert s["rows_checked"] == s["members_read"] == len(made["kept"])
  assert s["input_files_checked"] == 44 and report["flagged_files_checked"] == 6
  assert Path(report["report_page"]).read_text().count('data-verdict="ok"') == 1


def test_a_flipped_byte_is_named_by_read_data(collection, tmp_path):
  _, _, out = collection
  rows = read_rows(out / "metadata")
  row = rows[3]
  obj = Path(row["storage"]["uri"])
  data = bytearray(obj.read_bytes())
  data[row["storage"]["member_offset"] + row["storage"]["member_length"] // 2
       ] ^= 0x01
  obj.write_bytes(bytes(data))
  # Plain verify: the local object's MD5 is not its rows' any more.
  code, report = verify(out, tmp_path)
  assert code == 1
  assert [p["object"] for p in _problems(report, "object_changed")] == [
      row["storage"]["object"]]
  assert "MD5" in _problems(report, "object_changed")[0]["detail"]
  # --read_data: which image it is.
  code, report = verify(out, tmp_path, "--read_data")
  assert code == 1
  corrupt = _problems(report, "corrupt_member")
  assert [(p["sop_instance_uid"], p["member"]) for p in corrupt] == [
      (row["sop_instance_uid"], row["storage"]["member"])]


def test_deleted_truncated_and_replaced_objects_are_named(collection,
                                                          tmp_path):
  _, _, out = collection
  deleted, truncated, replaced, other = _objects(out)[:4]
  deleted.unlink()
  truncated.write_bytes(truncated.read_bytes()[:1000])
  replaced.write_bytes(other.read_bytes())
  code, report = verify(out, tmp_path)
  assert code == 1
  key = lambda p: p.relative_to(out / "bucket").as_posix()  # noqa: E731
  assert [p["object"] for p in _problems(report, "missing_object")] == [
      key(deleted)]
  assert sorted(p["object"] for p in _problems(report, "object_changed")) == (
      sorted([key(truncated), key(replaced)]))
  assert report["summary"]["problems"] == 3


def test_a_study_without_rows_is_an_orphan(collection, tmp_path):
  _, made, out = collection
  study = made["kept"][0].study_uid
  for path in (out / "metadata").glob("rows-*.json"):
    lines = [line for line in path.read_text().splitlines()
             if f'"study_instance_uid": "{study}"' not in line]
    path.write_text("".join(line + "\n" for line in lines))
  code, report = verify(out, tmp_path)
  assert code == 1
  orphans = _problems(report, "orphan_object")
  assert len(orphans) == 1 and made["kept"][0].entity in orphans[0]["object"]
  assert report["summary"]["problems"] == 1


def test_an_extra_object_and_a_partial_one_are_named(collection, tmp_path):
  _, _, out = collection
  first = _objects(out)[0]
  extra = first.with_name(first.name.replace(".tar.gz", "X.tar.gz"))
  shutil.copyfile(first, extra)
  partial = first.with_name(first.name + ".partial")
  partial.write_bytes(first.read_bytes()[:500])
  code, report = verify(out, tmp_path)
  assert code == 1
  assert [Path(p["object"]).name for p in _problems(
      report, "orphan_object")] == [extra.name]
  assert [Path(p["object"]).name for p in _problems(
      report, "partial_object")] == [partial.name]


def test_a_flagged_file_inside_an_object_is_found_with_input(collection,
                                                             tmp_path):
  """The PHI proof: an object someone made holding a flagged file."""
  root, made, out = collection
  name = "SUBJ001_20190110_HIDDEN/PHI/suspect.dcm"
  hidden = (out / "bucket" / "Collection/IRB41449/Entity/SUBJ001/"
            "SUBJ001_20190110_HIDDEN.tar.gz")
  hidden.write_bytes(archive_holding(name, made["flagged"][0].read_bytes()))
  code, report = verify(out, tmp_path, f"--input={root}")
  assert code == 1
  stored = _problems(report, "flagged_file_stored")
  assert [(p["object"], p["member"]) for p in stored] == [
      (hidden.relative_to(out / "bucket").as_posix(), name)]
  # Without --input the object is an orphan, but nothing says it is PHI.
  code, report = verify(out, tmp_path)
  assert not _problems(report, "flagged_file_stored")
  assert len(_problems(report, "orphan_object")) == 1


def test_an_input_file_changed_since_it_was_stored_is_named(collection,
                                                            tmp_path):
  root, made, out = collection
  copy = tmp_path / "input"
  shutil.copytree(root, copy)
  changed = copy / made["kept"][0].path.relative_to(root)
  data = bytearray(changed.read_bytes())
  data[-1] ^= 0xFF   # pixel data: the header, and so its study, unchanged
  changed.write_bytes(bytes(data))
  code, report = verify(out, tmp_path, f"--input={copy}")
  assert code == 1
  assert [p["path"] for p in _problems(report, "input_not_stored")] == [
      str(changed)]


def test_a_fraction_reads_the_same_members_every_time(collection, tmp_path):
  _, _, out = collection
  rows = read_rows(out / "metadata")
  wanted = sum(sampled(r["storage"]["object"], r["storage"]["member_offset"],
                       0.5) for r in rows)
  assert 0 < wanted < len(rows)
  for _ in range(2):
    code, report = verify(out, tmp_path, "--read_data_fraction=0.5")
    assert code == 0 and report["summary"]["members_read"] == wanted
  assert [sampled("k", i, 0.3) for i in range(50)] == [
      sampled("k", i, 0.3) for i in range(50)]


def test_bad_options_exit_2(tmp_path, capsys):
  assert main(["--bucket=/x", "--collection=bad name",
               "--metadata_output=/x"]) == 2
  assert capsys.readouterr().err.startswith("error: --collection")
  with pytest.raises(SystemExit) as exit_:
    main(["--bucket=/x", "--collection=C", "--read_dat"])
  assert exit_.value.code == 2
