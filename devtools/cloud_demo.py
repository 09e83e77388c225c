"""`make run-cloud`: the pipeline against local Cloud Storage and BigQuery
emulators, end to end, offline.

Starts fake-gcs-server and bqemulator on free loopback ports, runs the
pipeline on the sample data with `--bucket gs://radiology
--bigquery_project demo-project` (only STORAGE_EMULATOR_HOST and
BIGQUERY_EMULATOR_HOST point it at the emulators), prints rows from a real
query and of a nested-sequence query, fetches one image back with one ranged read, and stops both servers.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from devtools.emulators import (bigquery_emulator, clients_reach,
                                create_bucket, gcs_emulator)

PROJECT = "demo-project"
COLLECTION = "IRB41449"
REPO = Path(__file__).resolve().parents[1]


def shipped_query(name: str, **params):
  """The rows a file in queries/ gives on the emulator's table."""
  from transforms.bigquery import query_rows
  sql = (REPO / "queries" / name).read_text().replace(
      "my-research-project", PROJECT)
  return list(query_rows(f"{PROJECT}:{COLLECTION}.dicom", sql, params))


def main() -> int:
  sample = Path(sys.argv[1] if len(sys.argv) > 1 else "sample/input")
  with gcs_emulator() as gcs, bigquery_emulator(PROJECT) as bq, \
      clients_reach(gcs, bq):
    create_bucket(gcs, "radiology")
    print(f"Cloud Storage emulator at {gcs}, BigQuery emulator at {bq}\n")
    command = [sys.executable, "-m", "pipeline", f"--input={sample}",
               "--bucket=gs://radiology", f"--collection={COLLECTION}",
               f"--bigquery_project={PROJECT}"]
    print("$ python " + " ".join(command[1:]))
    done = subprocess.run(command, cwd=REPO)
    if done.returncode:
      return done.returncode

    print("\nqueries/ct_study_objects.sql:")
    for row in shipped_query("ct_study_objects.sql"):
      print(f"  {row['entity_id']}  {row['StudyDate']}  {row['uri']}")
    print("\nqueries/images_with_procedure_modifier.sql, meaning 'right' (a "
          "modifier two sequence levels deep):")
    for row in shipped_query("images_with_procedure_modifier.sql",
                             meaning="right"):
      print(f"  {row['entity_id']}  {row['sop_instance_uid']}  first "
            f"procedure {row['first_procedure_code']}")

    from transforms.bigquery import bigquery_client
    sql = (f"SELECT sop_instance_uid, storage.member AS member "
           f"FROM `{PROJECT}.{COLLECTION}.dicom_current` "
           f"ORDER BY sop_instance_uid LIMIT 1")
    one = list(bigquery_client(PROJECT).query(sql).result())[0]
    out = REPO / "out" / "fetched.dcm"
    out.parent.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "pipeline.fetch",
               f"--sop_instance_uid={one['sop_instance_uid']}",
               f"--bigquery_table={PROJECT}:{COLLECTION}.dicom",
               f"--out={out}"]
    print("\n$ python " + " ".join(command[1:]))
    done = subprocess.run(command, cwd=REPO)
    if done.returncode:
      return done.returncode
    print(f"  {one['member']}: sha256 "
          f"{hashlib.sha256(out.read_bytes()).hexdigest()[:16]}...")
  print("\nEmulators stopped.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
