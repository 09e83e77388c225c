"""Thousands of files under a small file-handle limit, and no temp litter."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from devtools.sample_data import fresh_uid

REPO = Path(__file__).parents[1]
IMAGES = 5000


def _many_small_images(root: Path) -> None:
  source = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
  for n in range(IMAGES):
    entity, study = f"E{n % 5}", n % 20
    ds = copy.copy(source)
    ds.StudyInstanceUID = fresh_uid("many", entity, study)
    ds.SOPInstanceUID = fresh_uid("many", n)
    ds.file_meta = copy.copy(source.file_meta)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = root / entity / f"s{study}" / f"{n:05d}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_5000_images_under_ulimit_256_leave_no_temp_files(tmp_path):
  root = tmp_path / "input"
  _many_small_images(root)
  tmp = tmp_path / "tmp"
  tmp.mkdir()
  command = (f"ulimit -n 256 && exec {sys.executable} -m pipeline "
             f"--input={root} --bucket={tmp_path / 'bucket'} "
             f"--collection=LIMITS --metadata_output={tmp_path / 'metadata'}")
  done = subprocess.run(["bash", "-c", command], cwd=REPO, text=True,
                        capture_output=True, env={**os.environ, "TMPDIR": str(tmp)})
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"images seen {IMAGES}: kept {IMAGES}, flagged 0, rejected 0" in done.stdout
  rows = [line for f in (tmp_path / "metadata").glob("rows-*.json")
          for line in f.read_text().splitlines()]
  assert len(rows) == IMAGES
  assert len(list((tmp_path / "bucket").rglob("*.tar.gz"))) == 20
  assert list(tmp.iterdir()) == []
