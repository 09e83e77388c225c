"""The promises every run must keep, checked on what a run left behind.

Used by the end-to-end tests: objects are read back three ways (tarfile,
the system's tar and gzip -t, and member by member through the recorded
offsets) and compared with the input files byte for byte.
"""
from __future__ import annotations

import base64
import hashlib
import io
import shutil
import subprocess
import tarfile
import zlib
from pathlib import Path
from typing import Dict, List

from transforms.keys import STUDY_OBJECT_KEY_PATTERN
from transforms.report import read_stored_listing


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def read_member_at(obj: bytes, offset: int, length: int) -> tarfile.TarInfo:
  """Decompresses one gzip member alone and parses the tar entry in it."""
  d = zlib.decompressobj(31)
  raw = d.decompress(obj[offset:offset + length]) + d.flush()
  assert d.eof and not d.unused_data, "range is not exactly one gzip member"
  with tarfile.open(fileobj=io.BytesIO(raw + b"\0" * 1024), mode="r:") as t:
    info = t.next()
    return info, t.extractfile(info).read()


def archive_members(path: Path) -> Dict[str, bytes]:
  with tarfile.open(path, "r:gz") as t:
    return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def check_with_system_tools(path: Path) -> None:
  if shutil.which("gzip"):
    subprocess.run(["gzip", "-t", str(path)], check=True)
  if shutil.which("tar"):
    subprocess.run(["tar", "tzf", str(path)], check=True,
                   stdout=subprocess.DEVNULL)


def all_input_files(root: Path) -> List[Path]:
  return sorted(p for p in root.rglob("*") if p.is_file())


def check_run(input_root: Path, bucket: Path, rows: List[dict], report: dict,
              collection: str = "IRB41449") -> Dict[str, bytes]:
  """Asserts the invariants; returns {object path: bytes} for more checks."""
  objects = {p: p.read_bytes() for p in sorted(bucket.rglob("*.tar.gz"))
             if p.is_file()}
  assert not list(bucket.rglob("*.partial")), "partial object left behind"
  members_by_object = {}
  for path, data in objects.items():
    key = path.relative_to(bucket).as_posix()
    m = STUDY_OBJECT_KEY_PATTERN.match(key)
    assert m and m["collection"] == collection, f"bad key {key}"
    check_with_system_tools(path)
    members_by_object[path] = archive_members(path)

  # The report partitions the input: each file listed exactly once.
  stored_listing = read_stored_listing(report)
  listed = ([s["path"] for s in stored_listing] +
            [e["path"] for s in ("flagged", "rejected", "failed")
             for e in report[s]])
  assert sorted(listed) == sorted(str(p) for p in all_input_files(input_root))

  # Each stored file is in exactly one archive, its entity's, byte-identical.
  stored = {s["path"]: s for s in stored_listing}
  digests = {}
  for path, members in members_by_object.items():
    entity = path.parent.name
    for name, data in members.items():
      if name.endswith("/manifest.json"):
        continue
      digests.setdefault(sha256(data), []).append((path, name, entity))
  for src, where in stored.items():
    data = Path(src).read_bytes()
    hits = digests.get(sha256(data), [])
    assert len(hits) == 1, f"{src} stored {len(hits)} times"
    obj, name, entity = hits[0]
    rel = Path(src).relative_to(input_root)
    assert rel.parts[0] == entity, f"{src} stored under entity {entity}"
    assert str(obj) == where["object"] and name == where["member"]

  # Nothing flagged is in any archive; nothing rejected or failed either,
  # unless the very same bytes were stored from another path (a duplicate).
  stored_digests = {sha256(Path(p).read_bytes()) for p in stored}
  for status in ("flagged", "rejected", "failed"):
    for e in report[status]:
      digest = sha256(Path(e["path"]).read_bytes())
      if status == "flagged" or digest not in stored_digests:
        assert digest not in digests, f"{status} {e['path']} uploaded"

  # One row per kept image, pointing at its member, with the object's MD5.
  assert len(rows) == len(stored)
  # An image is one SOP instance of one study of one entity.
  assert len({(r["entity_id"], r["study_instance_uid"], r["sop_instance_uid"])
              for r in rows}) == len(rows)
  for row in rows:
    st = row["storage"]
    obj = Path(st["uri"])
    data = objects[obj]
    assert st["md5_hash"] == base64.b64encode(
        hashlib.md5(data).digest()).decode()
    assert st["size_bytes"] == len(data)
    assert st["member"] in members_by_object[obj]
    info, member_bytes = read_member_at(data, st["member_offset"],
                                        st["member_length"])
    assert info.name == st["member"]
    assert sha256(member_bytes) == st["member_sha256"]
    assert member_bytes == members_by_object[obj][st["member"]]
  return objects


def archive_holding(member: str, data: bytes) -> bytes:
  """A study object made by hand (as someone tampering would) holding one
  file as its member, with a manifest that lists it."""
  from transforms.archive_format import StudyArchiveWriter
  import json
  sink = io.BytesIO()
  writer = StudyArchiveWriter(sink)
  offset, length = writer.add_bytes(member, data)
  manifest = {"members": [{"member": member, "sop_instance_uid": "9.9",
                           "sha256": sha256(data), "size_bytes": len(data),
                           "member_offset": offset, "member_length": length}]}
  root = member.split("/", 1)[0]
  writer.close(*writer.add_bytes(f"{root}/manifest.json",
                                 json.dumps(manifest).encode()))
  return sink.getvalue()
