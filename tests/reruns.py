"""Re-run scenarios shared by the local and the emulator suites: the state a
run leaves, and how to compare it with a clean run's."""
from __future__ import annotations

import copy
import datetime
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pydicom

from devtools.sample_data import fresh_uid

State = Tuple[Dict[str, bytes], List[tuple]]


def current_rows_key(rows: List[dict]) -> List[tuple]:
  """What a researcher sees of current rows: image -> where it lives."""
  return sorted((r["entity_id"], r["study_instance_uid"], r["sop_instance_uid"],
                 r["storage"]["object"], r["storage"]["member"],
                 r["storage"]["member_offset"], r["storage"]["member_length"],
                 r["storage"]["member_sha256"]) for r in rows)


def add_image_to_study(instance, name: str = "late.dcm") -> Path:
  """A late-arriving image in the same study as `instance` (a sample one)."""
  ds = pydicom.dcmread(instance.path)
  ds.SOPInstanceUID = fresh_uid("late", instance.sop_uid)
  ds.file_meta = copy.copy(ds.file_meta)
  ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
  path = instance.path.parent / name
  ds.save_as(path, enforce_file_format=True)
  return path


def assert_same_state(got: State, clean: State) -> None:
  got_objects, got_rows = got
  clean_objects, clean_rows = clean
  assert sorted(got_objects) == sorted(clean_objects)
  for key in clean_objects:
    assert got_objects[key] == clean_objects[key], f"{key} differs"
  assert got_rows == clean_rows
  assert len({r[:3] for r in got_rows}) == len(got_rows), "duplicate current rows"


def wait_for_lease_to_expire(lease: dict) -> None:
  """Sleeps until just past the time a lease record says it expires."""
  expires = datetime.datetime.fromisoformat(lease["expires"].replace(
      "Z", "+00:00"))
  time.sleep(max(0.0, (expires - datetime.datetime.now(
      datetime.timezone.utc)).total_seconds()) + 0.5)
