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

from conftest import IN_PROCESS, PROJECT, check_export_folder, local_pipeline
from pipeline.run import main, run
from transforms.bigquery import bigquery_client, ensure_dataset_and_view
from transforms.gcs import storage_client
from transforms.keys import STUDY_OBJECT_KEY_PATTERN
from transforms.report import read_stored_listing
from transforms.schema import TABLE_SCHEMA
from transforms.sinks import CheckRows, WriteRowsBigQuery

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
  # Its rows also go to a local folder: queries are answered both ways on
  # the same rows.
  local_rows = tmp_path_factory.mktemp("local_rows")
  report = run([
      "--input=gs://pacs-export/sample", "--bucket=gs://radiology",
      "--collection=IRB41449", f"--bigquery_project={PROJECT}",
      f"--metadata_output={local_rows}",
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


def test_typed_and_keyword_values_are_queryable(cloud_run):
  _, made = cloud_run
  ct = query(f"SELECT COUNT(*) AS n FROM `{PROJECT}.IRB41449.dicom_current` "
             "WHERE Modality = 'CT' AND StudyDate >= DATE '2019-01-01'")
  assert ct[0]["n"] > 0
  first = query(
      f"SELECT sop_instance_uid FROM `{PROJECT}.IRB41449.dicom_current` "
      "WHERE JSON_VALUE(metadata, '$.RequestedProcedureCodeSequence[0]"
      ".ProcedureCodeSequence[0].CodeMeaning') = 'left' AND JSON_VALUE("
      "metadata, '$.RequestedProcedureCodeSequence[0].CodeValue') = '24627-0'")
  assert sorted(r["sop_instance_uid"] for r in first) == _kept(
      made, lambda k: _where(k) == ("SUBJ001", "study1"))


def _where(instance):
  """(entity, study folder) of a sample instance."""
  return instance.entity, instance.path.parts[-3]


def _kept(made, keep):
  return sorted(k.sop_uid for k in made["kept"] if keep(k))


# Each file in queries/: its parameters, the column checked, and what it
# must answer on the sample (devtools/sample_data.py says what each entity,
# study and series folder holds); None: worked out from the rows below.
SHIPPED = {
    "images_with_procedure_code.sql": (   # the second item only
        {"code": "36643-5"}, "sop_instance_uid",
        lambda made: _kept(made, lambda k: _where(k)[1] == "study2")),
    "images_with_procedure_modifier.sql": (
        {"meaning": "right"}, "sop_instance_uid",
        lambda made: _kept(made, lambda k: _where(k) in (
            ("SUBJ001", "study2"), ("SUBJ003", "study2")))),
    "images_with_private_tag.sql": (
        {"protocol": "protocol-2"}, "sop_instance_uid",
        lambda made: _kept(made, lambda k: k.path.parts[-2] == "series2")),
    "localizer_images.sql": (
        {}, "sop_instance_uid",
        lambda made: _kept(made, lambda k: k.path.parts[-2] == "series1")),
    "image_coordinates.sql": (None, "uri", None),
    "ct_study_objects.sql": ({}, "uri", None),
    "images_per_modality_body_part.sql": ({}, "images", None),
}


def test_every_query_file_is_checked():
  assert sorted(p.name for p in QUERIES.glob("*.sql")) == sorted(SHIPPED)


def _local_answer(report, name, params, capsys):
  from pipeline.query import main as query_main
  capsys.readouterr()
  code = query_main([f"@{QUERIES / name}", "--format=jsonl",
                     f"--metadata_output={report['metadata_output']}",
                     *[f"--param={k}={v}" for k, v in params.items()]])
  out = capsys.readouterr().out
  assert code == 0
  return [json.loads(line) for line in out.splitlines()]


def _plain(rows):
  from pipeline.query import plain
  return [json.loads(json.dumps(plain(r))) for r in rows]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_queries_answer_alike_on_the_emulator_and_locally(
    cloud_run, name, capsys):
  """Every query in queries/: its known answer on the emulator, and the
  same rows in the same order from python -m pipeline.query over the same
  run's local rows."""
  report, made = cloud_run
  params, column, expected = SHIPPED[name]
  current = query(f"SELECT Modality, BodyPartExamined, storage.uri AS uri, "
                  f"sop_instance_uid FROM `{PROJECT}.IRB41449.dicom_current`")
  if name == "image_coordinates.sql":
    one = made["kept"][3]
    params = {"sop_instance_uid": one.sop_uid}
    expected = [next(r["uri"] for r in current
                     if r["sop_instance_uid"] == one.sop_uid)]
  elif name == "ct_study_objects.sql":
    expected = sorted({r["uri"] for r in current if r["Modality"] == "CT"})
  elif name == "images_per_modality_body_part.sql":
    counts = {}
    for r in current:
      key = (r["Modality"], r["BodyPartExamined"])
      counts[key] = counts.get(key, 0) + 1
    expected = sorted(counts.values())
  else:
    expected = expected(made)
  on_emulator = query(shipped_query(name), **params)
  assert sorted(r[column] for r in on_emulator) == expected and expected
  assert _local_answer(report, name, params, capsys) == _plain(on_emulator)


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


def _export(tmp_path, name, *args, env=None):
  out = tmp_path / name
  done = subprocess.run(
      [sys.executable, "-m", "pipeline.export", f"--bigquery_table={TABLE}",
       f"--out={out}", *args], cwd=REPO, capture_output=True, text=True,
      env=env or os.environ)
  return done, out


def _exported(out):
  return {p.name[:-len(".dcm")]: p.read_bytes() for p in out.rglob("*.dcm")}


def _originals(made, sops):
  return {k.sop_uid: k.path.read_bytes() for k in made["kept"]
          if k.sop_uid in sops}


def test_export_from_bigquery_reads_each_run_of_members_once(
    cloud_run, emulators, tmp_path):
  """Through the counting proxy: a cohort (every MR image) comes in one
  GET per run of adjacent selected members, however many images, through
  transient 503s; the files are the originals."""
  from devtools.proxy import Faults, proxy_to
  from transforms.retrieve import Member, member_runs
  _, made = cloud_run
  rows = query(f"SELECT sop_instance_uid, storage.uri AS uri, "
               f"storage.member_offset AS o, storage.member_length AS n "
               f"FROM `{PROJECT}.IRB41449.dicom_current` WHERE Modality = 'MR'")
  adjacent = sum(len(member_runs([Member(r["o"], r["n"]) for r in rows
                                  if r["uri"] == uri], gap=0))
                 for uri in {r["uri"] for r in rows})
  with proxy_to(emulators["gcs"]) as proxy:
    done, out = _export(tmp_path, "mr", "--where=Modality = 'MR'", env={
        **os.environ, "STORAGE_EMULATOR_HOST": proxy.url})
  assert done.returncode == 0, done.stderr
  sops = {r["sop_instance_uid"] for r in rows}
  assert _exported(out) == _originals(made, sops) and len(sops) == 24
  gets = [e for e in proxy.exchanges if "alt=media" in e.path]
  assert len(gets) <= adjacent < len(sops)
  # Transient 503s on reads are retried; nothing is lost.
  with proxy_to(emulators["gcs"], Faults(unavailable=0.3, seed=5,
                                         only_methods=("GET",))) as flaky:
    done, out = _export(tmp_path, "flaky", "--where=Modality = 'MR'", env={
        **os.environ, "STORAGE_EMULATOR_HOST": flaky.url})
  assert done.returncode == 0, done.stderr
  assert any(e.fault == "503" for e in flaky.exchanges)
  assert _exported(out) == _originals(made, sops)


def test_export_from_bigquery_by_a_nested_condition_and_by_a_query(
    cloud_run, tmp_path):
  _, made = cloud_run
  done, out = _export(
      tmp_path, "nested", "--where=EXISTS (SELECT 1 FROM UNNEST("
      "JSON_QUERY_ARRAY(metadata, '$.RequestedProcedureCodeSequence')) AS p "
      "WHERE JSON_VALUE(p, '$.CodeValue') = @code)", "--param=code=36643-5")
  assert done.returncode == 0, done.stderr
  study2 = set(_kept(made, lambda k: _where(k)[1] == "study2"))
  assert _exported(out) == _originals(made, study2)
  done, out = _export(
      tmp_path, "bysql",
      f"--sql=@{QUERIES / 'images_with_procedure_modifier.sql'}",
      "--param=meaning=right", "--layout=member")
  assert done.returncode == 0, done.stderr
  right = set(_kept(made, lambda k: _where(k) in (("SUBJ001", "study2"),
                                                  ("SUBJ003", "study2"))))
  assert len(list(out.rglob("*.dcm"))) == len(right) == 12


def test_export_from_bigquery_killed_completed_then_nothing_to_do(
    cloud_run, emulators, tmp_path):
  """Killed mid-way (SIGKILL), completed by a re-run: every image byte for
  byte and the manifest right; a third run reads no object."""
  from devtools.proxy import proxy_to
  _, made = cloud_run
  crash = {**os.environ, "DICOM_STORAGE_CRASH_AT": "export_partial:5"}
  killed, out = _export(tmp_path, "all", "--where=TRUE", "--workers=2",
                        env=crash)
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert list(out.rglob("*.exporting"))
  done, _ = _export(tmp_path, "all", "--where=TRUE", "--workers=2")
  assert done.returncode == 0, done.stderr
  assert not list(out.rglob("*.exporting"))
  check_export_folder(out, made["kept"])
  before = {p: p.stat().st_mtime_ns for p in out.rglob("*.dcm")}
  with proxy_to(emulators["gcs"]) as proxy:
    again, _ = _export(tmp_path, "all", "--where=TRUE", env={
        **os.environ, "STORAGE_EMULATOR_HOST": proxy.url})
  assert again.returncode == 0, again.stderr
  assert "0 written, 36 already there" in again.stdout
  assert not [e for e in proxy.exchanges if "alt=media" in e.path]
  assert {p: p.stat().st_mtime_ns for p in out.rglob("*.dcm")} == before


def test_export_names_an_object_gone_from_the_bucket(cloud_run, tmp_path):
  """An object deleted after its rows were written: its images are named
  with the reason, the rest are exported, exit 1. (Deleted from a copy of
  the bucket's state: put back after, for the other tests.)"""
  _, made = cloud_run
  one = made["kept"][0]
  uri = query(shipped_query("image_coordinates.sql"),
              sop_instance_uid=one.sop_uid)[0]["uri"]
  blob = storage_client().bucket("radiology").blob(
      uri[len("gs://radiology/"):])
  data = blob.download_as_bytes()
  blob.delete()
  try:
    done, out = _export(tmp_path, "gone", "--where=entity_id = 'SUBJ001'")
  finally:
    blob.upload_from_string(data)
  assert done.returncode == 1
  assert "is gone" in done.stderr and "could not be had" in done.stderr
  failed = (out / "failed.csv").read_text().splitlines()[1:]
  assert len(failed) == 6 and all(f",{uri}," in line for line in failed)
  assert len(_exported(out)) == 6   # SUBJ001's other study


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
  # A load job takes metadata as the nested object: the same keyword
  # queries work on it as on streamed rows.
  assert _procedure_images(f"{PROJECT}.FILELOADS.dicom") == _kept(
      made, lambda k: _where(k)[1] == "study2")
  # And the local row files load as they are, with schema.json (bq load).
  from google.cloud import bigquery
  client = bigquery_client(PROJECT)
  schema = [bigquery.SchemaField.from_api_repr(f) for f in
            json.loads((tmp_path / "schema.json").read_text())]
  client.create_dataset("LOCALLOAD", exists_ok=True)
  for rows_file in sorted(tmp_path.glob("rows-*.json")):
    with open(rows_file, "rb") as f:
      client.load_table_from_file(
          f, f"{PROJECT}.LOCALLOAD.dicom", job_config=bigquery.LoadJobConfig(
              source_format="NEWLINE_DELIMITED_JSON", schema=schema)).result()
  assert _procedure_images(f"{PROJECT}.LOCALLOAD.dicom") == _kept(
      made, lambda k: _where(k)[1] == "study2")


def _procedure_images(table: str):
  return sorted(r["sop_instance_uid"] for r in query(
      shipped_query("images_with_procedure_code.sql").replace(
          f"{PROJECT}.IRB41449.dicom_current", table), code="36643-5"))


def test_a_table_of_an_earlier_version_stops_the_run(emulators, sample,
                                                      tmp_path, capsys):
  """A table whose metadata is STRING (before the keyword JSON) is never
  mixed with new rows: the run stops before any work, naming it."""
  from google.cloud import bigquery
  root, _ = sample
  client = bigquery_client(PROJECT)
  client.create_dataset("OLDVERSION", exists_ok=True)
  old = [dict(f, type="STRING") if f["name"] == "metadata" else f
         for f in TABLE_SCHEMA["fields"]]
  client.create_table(bigquery.Table(
      f"{PROJECT}.OLDVERSION.dicom",
      schema=[bigquery.SchemaField.from_api_repr(f) for f in old]))
  code = main([f"--input={root}", f"--bucket={tmp_path / 'bucket'}",
               "--collection=OLDVERSION", f"--bigquery_project={PROJECT}",
               *IN_PROCESS])
  assert code == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1 and error[0].startswith(
      f"error: BigQuery table {PROJECT}:OLDVERSION.dicom does not fit")
  assert "(metadata is STRING, not JSON)" in error[0]
  assert "--bigquery_table PROJECT:DATASET.NEW_TABLE" in error[0]
  assert not list((tmp_path / "bucket").rglob("*.tar.gz"))
  assert not query(f"SELECT * FROM `{PROJECT}.OLDVERSION.dicom`")


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


def test_a_command_line_run_loads_bigquery_at_its_first_use(emulators, sample,
                                                            tmp_path):
  """`python -m pipeline` leaves the cloud clients it may not use unloaded
  (pipeline/lazy_imports.py); a run with a table loads BigQuery's when it
  first needs it, and its rows arrive."""
  root, made = sample
  done = subprocess.run(
      [sys.executable, "-m", "pipeline", f"--input={root}",
       f"--bucket={tmp_path / 'bucket'}", "--collection=LAZYCLI",
       f"--bigquery_project={PROJECT}", f"--report={tmp_path / 'report.json'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  kept = json.loads((tmp_path / "report.json").read_text())["summary"]["kept"]
  assert kept == len(made["kept"])
  assert query(f"SELECT COUNT(*) AS n FROM `{PROJECT}.LAZYCLI.dicom`"
               )[0]["n"] == kept
