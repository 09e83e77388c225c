"""Transient Cloud Storage and BigQuery failures (503s, dropped connections)
injected by a proxy in front of the emulators: the run retries and ends
with everything stored, exactly once."""
from __future__ import annotations

import collections

import pytest

from conftest import IN_PROCESS, PROJECT
from devtools.emulators import clients_reach
from devtools.proxy import Faults, proxy_to
from pipeline.run import run
from test_cloud import query
from transforms.gcs import storage_client


@pytest.fixture
def flaky(emulators):
  """Both emulators behind fault-injecting proxies, for one test."""
  faults = Faults(unavailable=0.15, cut=0.05, seed=3)
  with proxy_to(emulators["gcs"], faults) as gcs, \
      proxy_to(emulators["bigquery"], faults) as bq, \
      clients_reach(gcs.url, bq.url):
    yield gcs, bq


def test_transient_errors_are_retried_and_nothing_is_lost(emulators, sample, flaky):
  root, made = sample
  emulators["create_bucket"]("flaky")
  gcs, bq = flaky
  report = run([f"--input={root}", "--bucket=gs://flaky",
                "--collection=IRB41449",
                f"--bigquery_table={PROJECT}:FLAKY.dicom", *IN_PROCESS])
  faults = collections.Counter(e.fault for e in gcs.exchanges + bq.exchanges
                               if e.fault)
  assert faults["503"] > 0 and faults["cut"] > 0   # faults did happen
  assert report["summary"]["kept"] == len(made["kept"])
  assert report["summary"]["failed"] == 0
  assert report["summary"]["dead_letter_rows"] == 0
  rows = query(f"SELECT sop_instance_uid FROM `{PROJECT}.FLAKY.dicom_current`")
  assert sorted(r["sop_instance_uid"] for r in rows) == sorted(
      k.sop_uid for k in made["kept"])
  objects = [b for b in storage_client().list_blobs("flaky")
             if b.name.startswith("Collection/")]
  assert len(objects) == report["summary"]["studies"] == 6


def test_a_study_refused_for_good_fails_alone(emulators, sample, tmp_path):
  """Permission denied on one study's key: that study is failed in the
  report, with no object and no rows; the others are stored; exit 1."""
  from pipeline.run import main
  from transforms.report import read_report
  root, made = sample
  emulators["create_bucket"]("denied")
  key = "SUBJ002_20190210_ACC0201.tar.gz"
  with proxy_to(emulators["gcs"], Faults(forbid=key)) as gcs, \
      clients_reach(gcs.url):
    code = main([f"--input={root}", "--bucket=gs://denied",
                 "--collection=IRB41449",
                 f"--bigquery_table={PROJECT}:DENIED.dicom",
                 f"--report={tmp_path / 'report.json'}", *IN_PROCESS])
  assert code == 1
  report = read_report(str(tmp_path / "report.json"))
  doomed = {str(k.path) for k in made["kept"]
            if k.entity == "SUBJ002" and k.path.parts[-3] == "study1"}
  assert {e["path"] for e in report["failed"]} == doomed
  assert report["summary"]["objects"] == 5
  names = [b.name for b in storage_client().list_blobs("denied")]
  assert not [n for n in names if n.endswith(key)]
  rows = query(f"SELECT storage.object AS o FROM `{PROJECT}.DENIED.dicom`")
  assert len(rows) == len(made["kept"]) - len(doomed)
  assert not [r for r in rows if r["o"].endswith(key)]
