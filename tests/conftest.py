"""Shared fixtures: a generated sample tree and a way to run the pipeline."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import List

import pydicom.config
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from devtools.sample_data import build_sample
from pipeline.run import run
from transforms.header_json import HeaderExport, serialize

# Tests run the DirectRunner in one process unless they ask for more: the
# multi-process mode is covered by its own end-to-end test.
IN_PROCESS = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]


def exported(header: dict, invalid=()) -> HeaderExport:
  """A header by keyword, as transforms/header_json.py exports one."""
  return HeaderExport(header, serialize(header), tuple(invalid))


def local_pipeline() -> TestPipeline:
  """A TestPipeline on the FnApiRunner, which Beam's DirectRunner falls back
  to offline anyway: its first try, the Prism runner, fails without a
  download and leaves a beam-temp* folder in /tmp on every pipeline."""
  return TestPipeline(runner="FnApiRunner")


@pytest.fixture(scope="module")
def ignore_invalid_values():
  """pydicom reads as the pipeline has it read headers
  (transforms/dicom.py _ReadHeader.setup): invalid values do not warn."""
  before = pydicom.config.settings.reading_validation_mode
  pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
  yield
  pydicom.config.settings.reading_validation_mode = before


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
  root = tmp_path_factory.mktemp("sample") / "input"
  made = build_sample(root, seed=7)
  return root, made


def run_pipeline(input_root: Path, out: Path, *extra: str,
                 collection: str = "IRB41449") -> dict:
  argv: List[str] = [
      f"--input={input_root}", f"--bucket={out / 'bucket'}",
      f"--collection={collection}", f"--metadata_output={out / 'metadata'}",
      *extra]
  if not any(a.startswith("--direct_running_mode") for a in extra):
    argv += IN_PROCESS
  return run(argv)


def read_rows(metadata_dir: Path, run_id: str = "") -> List[dict]:
  """Rows of one run (by its id), or of all runs in the folder."""
  rows = []
  for path in sorted(metadata_dir.glob(f"rows-{run_id or '*'}-*.json")):
    rows += [json.loads(line) for line in path.read_text().splitlines() if line]
  return rows


def export_manifest(out: Path):
  with open(out / "manifest.csv", newline="") as f:
    return list(csv.DictReader(f))


def check_export_folder(out: Path, expected, layout="uid"):
  """Every expected instance exported, byte for byte, and nothing else;
  the manifest says where each is and what it is."""
  files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                 if p.is_file() and p.name not in ("manifest.csv", "failed.csv"))
  want = {}
  for instance in expected:
    if layout == "uid":
      rel = (f"{instance.entity}/{instance.study_uid}/{instance.series_uid}/"
             f"{instance.sop_uid}.dcm")
    else:
      rel = f"{instance.entity}/" + "/".join(instance.path.parts[-3:])
    want[rel] = instance
  assert files == sorted(want)
  for rel, instance in want.items():
    assert (out / rel).read_bytes() == instance.path.read_bytes(), rel
  manifest = export_manifest(out)
  assert sorted(m["path"] for m in manifest) == sorted(want)
  for m in manifest:
    data = (out / m["path"]).read_bytes()
    assert m["sha256"] == hashlib.sha256(data).hexdigest()
    assert int(m["size_bytes"]) == len(data)
    assert m["sop_instance_uid"] == want[m["path"]].sop_uid
    assert int(m["member_length"]) > 0 and m["object_uri"].endswith(".tar.gz")


@pytest.fixture(scope="session")
def sample_run(sample, tmp_path_factory):
  """One pipeline run over the sample, shared by tests that only read it."""
  root, made = sample
  out = tmp_path_factory.mktemp("sample_run")
  report = run_pipeline(root, out)
  return out, report, read_rows(out / "metadata", report["run_id"])


PROJECT = "emu-project"


@pytest.fixture(scope="module")
def emulators(tmp_path_factory):
  """Cloud Storage and BigQuery emulators for one test module, reached the
  standard way (STORAGE_EMULATOR_HOST, BIGQUERY_EMULATOR_HOST); stopped, and
  the variables restored, when the module ends, even on failure."""
  emulators = pytest.importorskip("devtools.emulators")
  gcs_root = tmp_path_factory.mktemp("gcs")
  with emulators.gcs_emulator(root=gcs_root) as gcs_url, \
      emulators.bigquery_emulator(PROJECT, gcs_root=gcs_root) as bq_url, \
      emulators.clients_reach(gcs_url, bq_url):
    yield {"gcs": gcs_url, "bigquery": bq_url, "project": PROJECT,
           "create_bucket": lambda name: emulators.create_bucket(gcs_url, name)}
