"""python -m pipeline.fetch: one image back from its study object."""
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.fetch import main
from transforms.retrieve import RetrievalError, fetch_member, read_range

REPO = Path(__file__).parents[1]


def test_fetch_by_sop_instance_uid_from_local_rows(sample, sample_run, tmp_path):
  _, made = sample
  out, _, rows = sample_run
  instance = made["kept"][4]
  dest = tmp_path / "one.dcm"
  done = subprocess.run(
      [sys.executable, "-m", "pipeline.fetch",
       f"--sop_instance_uid={instance.sop_uid}",
       f"--metadata_output={out / 'metadata'}", f"--out={dest}"],
      cwd=REPO, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  assert dest.read_bytes() == instance.path.read_bytes()


def test_fetch_by_coordinates_to_stdout(sample, sample_run):
  _, made = sample
  _, _, rows = sample_run
  row = rows[0]
  st = row["storage"]
  done = subprocess.run(
      [sys.executable, "-m", "pipeline.fetch", f"--uri={st['uri']}",
       f"--offset={st['member_offset']}", f"--length={st['member_length']}",
       f"--sha256={st['member_sha256']}"], cwd=REPO, capture_output=True)
  assert done.returncode == 0
  assert hashlib.sha256(done.stdout).hexdigest() == st["member_sha256"]
  source = next(k.path for k in made["kept"] if k.sop_uid == row["sop_instance_uid"])
  assert done.stdout == source.read_bytes()


def test_wrong_checksum_or_range_fails_loudly(sample_run, capsys):
  _, _, rows = sample_run
  st = rows[0]["storage"]
  with pytest.raises(RetrievalError, match="SHA-256 mismatch"):
    fetch_member(st["uri"], st["member_offset"], st["member_length"], "00" * 32)
  with pytest.raises(RetrievalError, match="exactly one gzip member|not a gzip"):
    fetch_member(st["uri"], st["member_offset"], st["member_length"] + 10)
  assert main([f"--uri={st['uri']}", f"--offset={st['member_offset'] + 1}",
               f"--length={st['member_length']}"]) == 1
  assert "error:" in capsys.readouterr().err


def test_read_range_reads_exactly_the_range(tmp_path):
  path = tmp_path / "x"
  path.write_bytes(bytes(range(100)))
  assert read_range(str(path), 10, 5) == bytes(range(10, 15))
  with pytest.raises(RetrievalError):
    read_range(str(path), 98, 5)
