"""The pipeline against real local servers: fake-gcs-server for Cloud
Storage and bqemulator for BigQuery, reached only through the standard
STORAGE_EMULATOR_HOST / BIGQUERY_EMULATOR_HOST variables."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from conftest import IN_PROCESS, PROJECT, local_pipeline
from pipeline.run import run
from transforms.bigquery import (WriteRowsBigQuery, bigquery_client,
                                 ensure_dataset_and_view)
from transforms.gcs import storage_client
from transforms.keys import STUDY_OBJECT_KEY_PATTERN
from transforms.report import read_stored_listing
from transforms.sinks import CheckRows

REPO = Path(__file__).parents[1]
QUERIES = REPO / "queries"
TABLE = f"{PROJECT}:IRB41449.dicom"


def query(sql: str, **params):
  from google.cloud import bigquery
  config = bigquery.QueryJobConfig(query_parameters=[
      bigquery.ScalarQueryParameter(k, "STRING", v) for k, v in params.items()])
  return [dict(r.items()) for r in
          bigquery_client(PROJECT).query(sql, job_config=config).result()]


def shipped_query(name: str) -> str:
  sql = (QUERIES / name).read_text()
  return sql.replace("my-research-project.IRB41449", f"{PROJECT}.IRB41449")


def upload_tree(root: Path, bucket: str, prefix: str) -> None:
  client = storage_client()
  for path in sorted(p for p in root.rglob("*") if p.is_file()):
    client.bucket(bucket).blob(
        f"{prefix}/{path.relative_to(root).as_posix()}").upload_from_filename(
            str(path))


@pytest.fixture(scope="module")
def cloud_run(emulators, sample, tmp_path_factory):
  root, made = sample
  for bucket in ("pacs-export", "radiology"):
    emulators["create_bucket"](bucket)
  upload_tree(root, "pacs-export", "sample")
  report = run([
      "--input=gs://pacs-export/sample", "--bucket=gs://radiology",
      "--collection=IRB41449", f"--bigquery_project={PROJECT}",
      f"--dead_letter={tmp_path_factory.mktemp('dead')}", *IN_PROCESS])
  return report, made


def test_the_report_accounts_for_every_input_object(cloud_run):
  report, _ = cloud_run
  inputs = sorted(f"gs://pacs-export/{b.name}"
                  for b in storage_client().list_blobs("pacs-export"))
  listed = sorted([s["path"] for s in read_stored_listing(report)] +
                  [e["path"] for k in ("flagged", "rejected", "failed")
                   for e in report[k]])
  assert listed == inputs


def test_objects_and_rows_agree(cloud_run):
  report, made = cloud_run
  assert report["summary"]["kept"] == len(made["kept"])
  assert report["summary"]["rows"] == len(made["kept"])
  rows = query(f"SELECT * FROM `{PROJECT}.IRB41449.dicom_current`")
  assert len(rows) == len(made["kept"])
  assert {r["sop_instance_uid"] for r in rows} == {k.sop_uid for k in made["kept"]}
  client = storage_client()
  for row in rows:
    st = row["storage"]
    assert STUDY_OBJECT_KEY_PATTERN.match(st["object"])
    blob = client.bucket("radiology").get_blob(st["object"])
    assert blob is not None and blob.md5_hash == st["md5_hash"]
    data = blob.download_as_bytes()
    assert base64.b64encode(hashlib.md5(data).digest()).decode() == st["md5_hash"]
    assert st["generation"] == blob.generation
    assert st["download_link"] and st["metadata_link"]
    assert st["uri"] == f"gs://radiology/{st['object']}"
  # No flagged file's bytes are in the bucket.
  bucket_bytes = b"".join(b.download_as_bytes()
                          for b in client.list_blobs("radiology"))
  for path in made["flagged"]:
    assert path.read_bytes()[-4096:] not in bucket_bytes


def test_typed_and_nested_values_are_queryable(cloud_run):
  _, made = cloud_run
  ct = query(f"SELECT COUNT(*) AS n FROM `{PROJECT}.IRB41449.dicom_current` "
             "WHERE Modality = 'CT' AND StudyDate >= DATE '2019-01-01'")
  assert ct[0]["n"] > 0
  nested = query(shipped_query("images_with_procedure_code.sql"),
                 code="24627-0")
  expected = {k.sop_uid for k in made["kept"]
              if k.entity == "SUBJ001" and k.path.parts[-3] == "study1"}
  assert {r["sop_instance_uid"] for r in nested} == expected


def test_the_shipped_queries_answer_correctly(cloud_run):
  _, made = cloud_run
  rows = query(f"SELECT Modality, BodyPartExamined, storage.uri AS uri, "
               f"entity_id, study_instance_uid "
               f"FROM `{PROJECT}.IRB41449.dicom_current`")
  ct_objects = sorted({r["uri"] for r in rows if r["Modality"] == "CT"})
  got = query(shipped_query("ct_study_objects.sql"))
  assert sorted(r["uri"] for r in got) == ct_objects and ct_objects
  counts = {}
  for r in rows:
    key = (r["Modality"], r["BodyPartExamined"])
    counts[key] = counts.get(key, 0) + 1
  got = query(shipped_query("images_per_modality_body_part.sql"))
  assert {(r["Modality"], r["BodyPartExamined"]): r["images"] for r in got} == counts
  one = made["kept"][3]
  got = query(shipped_query("image_coordinates.sql"), sop_instance_uid=one.sop_uid)
  assert len(got) == 1 and got[0]["uri"].startswith("gs://radiology/")


def test_fetch_one_image_transfers_only_its_member(cloud_run, emulators, tmp_path):
  """Through a counting proxy: the download is one ranged GET of the
  member's length, and the bytes are the source file's."""
  from devtools.proxy import proxy_to
  _, made = cloud_run
  one = made["kept"][5]
  coords = query(shipped_query("image_coordinates.sql"),
                 sop_instance_uid=one.sop_uid)[0]
  with proxy_to(emulators["gcs"]) as proxy:
    env = {**os.environ, "STORAGE_EMULATOR_HOST": proxy.url}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.fetch",
         f"--sop_instance_uid={one.sop_uid}", f"--bigquery_table={TABLE}",
         f"--out={tmp_path / 'one.dcm'}"],
        cwd=REPO, env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  assert (tmp_path / "one.dcm").read_bytes() == one.path.read_bytes()
  downloads = [e for e in proxy.exchanges if "alt=media" in e.path]
  assert len(downloads) == 1
  start, end = map(int, re.match(r"bytes=(\d+)-(\d+)", downloads[0].range).groups())
  assert (start, end - start + 1) == (coords["member_offset"],
                                      coords["member_length"])
  assert downloads[0].response_bytes == coords["member_length"]


def test_rows_that_do_not_fit_go_to_the_dead_letter_output(emulators):
  ensure_dataset_and_view(f"{PROJECT}:DEADLETTER.dicom")
  good = json.loads((REPO / "tests" / "data" / "row.json").read_text())
  bad_schema = {**good, "Rows": "many"}
  with local_pipeline() as p:
    checked = p | beam.Create([good, bad_schema]) | CheckRows()
    refused = checked.valid | WriteRowsBigQuery(f"{PROJECT}:DEADLETTER.dicom")
    assert_that(checked.dead_letter | beam.Map(lambda d: d["stage"]),
                equal_to(["schema check"]), label="schema")
    assert_that(refused, equal_to([]), label="refused")
  # A row that slips past the check but BigQuery refuses is returned too.
  refused_row = {**good, "StudyDate": "2019-13-45"}
  with local_pipeline() as p:
    refused = (p | beam.Create([refused_row])
               | WriteRowsBigQuery(f"{PROJECT}:DEADLETTER.dicom"))
    assert_that(refused | beam.Map(lambda d: (d["stage"], d["sop_instance_uid"])),
                equal_to([("bigquery insert", good["sop_instance_uid"])]))
  rows = query(f"SELECT sop_instance_uid FROM `{PROJECT}.DEADLETTER.dicom`")
  assert len(rows) == 1


def test_file_loads(emulators, sample, tmp_path):
  root, made = sample
  emulators["create_bucket"]("fl-bucket")
  report = run([
      f"--input={root}", "--bucket=gs://fl-bucket", "--collection=IRB41449",
      f"--bigquery_table={PROJECT}:FILELOADS.dicom",
      "--bigquery_method=FILE_LOADS", "--temp_location=gs://fl-bucket/tmp",
      f"--metadata_output={tmp_path}", *IN_PROCESS])
  assert report["summary"]["rows"] == len(made["kept"])
  got = query(f"SELECT COUNT(*) AS n FROM `{PROJECT}.FILELOADS.dicom`")
  assert got[0]["n"] == len(made["kept"])


@pytest.mark.parametrize("env,expected", [
    ({"GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/key.json"},
     "GOOGLE_APPLICATION_CREDENTIALS points at '/nonexistent/key.json'"),
    ({}, "No Google Cloud credentials found"),
])
def test_missing_credentials_fail_fast_with_the_fix(sample, tmp_path, env, expected):
  root, _ = sample
  clean = {k: v for k, v in os.environ.items()
           if not k.endswith("_EMULATOR_HOST")
           and k not in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT")}
  # No metadata server to ask: point the lookup at a closed loopback port.
  clean.update(HOME=str(tmp_path), GCE_METADATA_HOST="127.0.0.1:9",
               GCE_METADATA_IP="127.0.0.1:9", NO_GCE_CHECK="True", **env)
  done = subprocess.run(
      [sys.executable, "-m", "pipeline", f"--input={root}",
       "--bucket=gs://real-bucket", "--collection=IRB41449",
       "--bigquery_project=real-project"],
      cwd=REPO, env=clean, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and expected in last
  assert "gcloud auth application-default login" in last
