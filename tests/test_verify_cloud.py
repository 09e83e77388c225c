"""python -m pipeline.verify against the emulators: Cloud Storage objects
checked by generation, BigQuery's current rows; from a clean run, each
kind of damage found and named."""
import json

import pytest

from conftest import IN_PROCESS, PROJECT
from pipeline.run import run
from pipeline.verify import main
from invariants import archive_holding
from transforms.bigquery import bigquery_client
from transforms.gcs import storage_client


@pytest.fixture
def stored(emulators, sample, request):
  """A clean run into a bucket and a table of this test's own."""
  root, made = sample
  name = request.node.name.split("[")[0].replace("_", "-")[5:40].strip("-")
  emulators["create_bucket"](name)
  table = f"{PROJECT}:{name.replace('-', '_').upper()}.dicom"
  run([f"--input={root}", f"--bucket=gs://{name}", "--collection=IRB41449",
       f"--bigquery_table={table}", *IN_PROCESS])
  return root, made, name, table


def verify(name, table, tmp_path, *extra):
  report = tmp_path / "verify.json"
  code = main([f"--bucket=gs://{name}", "--collection=IRB41449",
               f"--bigquery_table={table}", f"--report={report}", *extra])
  return code, json.loads(report.read_text())


def _blobs(name):
  return sorted((b for b in storage_client().list_blobs(name)
                 if b.name.startswith("Collection/")), key=lambda b: b.name)


def _kinds(report):
  return {k: len(v) for k, v in report["problems"].items() if v}


def test_clean_then_a_flipped_byte(stored, tmp_path):
  root, _, name, table = stored
  before = [(b.name, b.generation) for b in storage_client().list_blobs(name)]
  count = f"SELECT COUNT(*) AS n FROM `{table.replace(':', '.')}`"
  rows = list(bigquery_client(PROJECT).query(count).result())[0]["n"]
  code, report = verify(name, table, tmp_path, "--read_data",
                        f"--input={root}")
  assert code == 0 and _kinds(report) == {}
  # Read-only: the bucket and the table are as they were.
  assert [(b.name, b.generation)
          for b in storage_client().list_blobs(name)] == before
  assert list(bigquery_client(PROJECT).query(count).result())[0]["n"] == rows
  blob = _blobs(name)[0]
  data = bytearray(blob.download_as_bytes())
  data[len(data) // 3] ^= 0x01
  blob.upload_from_string(bytes(data))   # a new generation, as any change
  code, report = verify(name, table, tmp_path)
  assert code == 1 and _kinds(report) == {"object_changed": 1}
  assert "generation" in report["problems"]["object_changed"][0]["detail"]
  code, report = verify(name, table, tmp_path, "--read_data")
  assert code == 1
  assert len(report["problems"]["corrupt_member"]) == 1
  assert report["problems"]["corrupt_member"][0]["sop_instance_uid"]


def test_deleted_truncated_replaced_extra_and_partial(stored, tmp_path):
  _, _, name, table = stored
  deleted, truncated, replaced, other = _blobs(name)[:4]
  bucket = storage_client().bucket(name)
  deleted.delete()
  bucket.blob(truncated.name).upload_from_string(
      truncated.download_as_bytes()[:1000])
  bucket.blob(replaced.name).upload_from_string(other.download_as_bytes())
  bucket.blob(other.name.replace(".tar.gz", "X.tar.gz")).upload_from_string(
      other.download_as_bytes())
  bucket.blob(other.name + ".partial").upload_from_string(b"half")
  code, report = verify(name, table, tmp_path)
  assert code == 1
  assert _kinds(report) == {"missing_object": 1, "object_changed": 2,
                            "orphan_object": 1, "partial_object": 1}
  assert report["problems"]["missing_object"][0]["object"] == deleted.name


def test_a_study_whose_rows_are_gone_is_an_orphan(stored, tmp_path, sample):
  """A table without one study's rows (as after a partial restore)."""
  _, made, name, table = stored
  project, rest = table.split(":")
  dataset = rest.split(".")[0]
  from transforms.bigquery import ensure_dataset_and_view
  restored = f"{project}:{dataset}.restored"
  ensure_dataset_and_view(restored)
  client = bigquery_client(PROJECT)
  rows = [dict(r) for r in client.query(
      f"SELECT * FROM `{project}.{dataset}.dicom` WHERE study_instance_uid "
      f"!= '{made['kept'][0].study_uid}'").result()]
  for row in rows:
    row["metadata"] = json.dumps(row["metadata"]) if not isinstance(
        row["metadata"], str) else row["metadata"]
    row["StudyDate"] = row["StudyDate"] and row["StudyDate"].isoformat()
    for k in ("SeriesDate", "ContentDate"):
      row[k] = row[k] and row[k].isoformat()
    row["storage"]["written_at"] = row["storage"]["written_at"].isoformat()
  assert not client.insert_rows_json(f"{project}.{dataset}.restored", rows)
  code, report = verify(name, restored, tmp_path)
  assert code == 1 and _kinds(report) == {"orphan_object": 1}
  assert made["kept"][0].entity in report["problems"]["orphan_object"][0][
      "object"]


def test_a_flagged_file_inside_an_object(stored, tmp_path):
  root, made, name, table = stored
  member = "SUBJ001_20190110_X/burned.dcm"
  key = "Collection/IRB41449/Entity/SUBJ001/SUBJ001_20190110_X.tar.gz"
  storage_client().bucket(name).blob(key).upload_from_string(
      archive_holding(member, made["flagged"][1].read_bytes()))
  code, report = verify(name, table, tmp_path, f"--input={root}")
  assert code == 1
  assert [(p["object"], p["member"]) for p in report["problems"][
      "flagged_file_stored"]] == [(key, member)]


def test_a_bucket_with_a_folder_in_it(emulators, sample, tmp_path):
  """--bucket gs://BUCKET/FOLDER: the run writes under the folder, and
  verify lists the collection there (not at the bucket's root)."""
  root, made = sample
  emulators["create_bucket"]("with-folder")
  table = f"{PROJECT}:WITH_FOLDER.dicom"
  # A stray object at the root's Collection/ must not be taken for one.
  storage_client().bucket("with-folder").blob(
      "Collection/IRB41449/Entity/X/stray.tar.gz").upload_from_string(b"x")
  run([f"--input={root}", "--bucket=gs://with-folder/archive",
       "--collection=IRB41449", f"--bigquery_table={table}", *IN_PROCESS])
  assert len([b for b in _blobs("with-folder")]) == 1   # only the stray
  code, report = verify("with-folder/archive", table, tmp_path)
  assert code == 0, _kinds(report)
  assert report["summary"]["objects_checked"] == 6
