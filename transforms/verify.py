"""Proof after the fact: a collection's objects checked against its current
rows, and (with pipeline.verify --input) against its input.

The rows come ordered by object and the objects are listed in key order,
so the two are compared object by object: only one object's rows are held
at a time. Each object is checked in a thread of a bounded pool:

- rows to object: the object exists, is the version the rows describe
  (Cloud Storage generation; size and MD5 of a local file), and every
  row's member lies inside it;
- object to rows: every object under Collection/<collection>/ has current
  rows, one per member of its manifest, and the manifest and the rows agree
  on each member's SOP instance, SHA-256, offset and length; an object
  without current rows is an orphan, a left-over .partial is named as such;
- with read_data, every member (or a deterministic sample) is read,
  decompressed and hashed against its row's SHA-256;
- given the SHA-256 of flagged input files, none is a member of any object
  (as its manifest and its rows say, and as the bytes read say).

Nothing is written to the bucket or the table.
"""

import base64
import concurrent.futures
import dataclasses
import hashlib
import itertools
import os
import threading
from typing import (Any, Dict, FrozenSet, Iterable, Iterator, List, Optional,
                    Tuple)

from transforms.archive_format import RetrievalError
from transforms.files import file_digest
from transforms.gcs import split_gs_uri
from transforms.keys import STUDY_OBJECT_KEY_PATTERN, join_uri
from transforms.retrieve import Member, member_runs, read_manifest, read_members

# The columns of the current rows verify reads, as BigQuery and local SQL
# both name them.
ROW_COLUMNS = (
    "entity_id, study_instance_uid, sop_instance_uid, "
    "storage.object AS object, storage.uri AS uri, storage.member AS member, "
    "storage.member_offset AS member_offset, "
    "storage.member_length AS member_length, "
    "storage.member_sha256 AS member_sha256, "
    "storage.member_size_bytes AS member_size_bytes, "
    "storage.size_bytes AS size_bytes, storage.md5_hash AS md5_hash, "
    "storage.generation AS generation")
DEFAULT_WORKERS = 8
PARTIAL_SUFFIX = ".partial"

# Kinds of problem, in the report's order, with what each means.
KINDS = {
    "missing_object": "current rows point to an object that does not exist",
    "object_changed": "the object is not the version its rows describe",
    "member_outside_object": "a row's member lies beyond the object's end",
    "orphan_object": "an object of the collection has no current rows",
    "partial_object": "a partial object left by a run that was killed",
    "unexpected_object": "an object under the collection that is not a "
                         "study object",
    "no_manifest": "the object has no readable manifest",
    "manifest_mismatch": "the manifest and the rows disagree on a member",
    "member_without_row": "a member of the manifest has no current row",
    "row_without_member": "a current row names no member of the manifest",
    "corrupt_member": "a member read back is not what its row describes",
    "flagged_file_stored": "a flagged input file's bytes are a member of "
                           "an object (PHI)",
    "input_not_stored": "an input file that should be stored is not in its "
                        "study's object",
    "input_not_checked": "an input file whose study could not be checked",
}


def rows_sql(table: str) -> str:
  return f"SELECT {ROW_COLUMNS} FROM {table} ORDER BY object, member_offset"


@dataclasses.dataclass(frozen=True)
class StoredObject:
  """An object as the store lists it."""
  key: str
  uri: str
  size: int
  md5_base64: Optional[str] = None    # Cloud Storage's; local: computed
  generation: Optional[int] = None


def list_objects(bucket: str, collection: str, gcs_client=None
                 ) -> List[StoredObject]:
  """Every object under Collection/<collection>/, in key order."""
  prefix = f"Collection/{collection}/"
  if bucket.startswith("gs://"):
    # The bucket may be gs://BUCKET/FOLDER: keys are under the folder.
    name, folder = split_gs_uri(join_uri(bucket, prefix))
    folder = folder[:-len(prefix)]
    return sorted((StoredObject(b.name[len(folder):], f"gs://{name}/{b.name}",
                                b.size, b.md5_hash, b.generation)
                   for b in gcs_client.list_blobs(name,
                                                  prefix=folder + prefix)),
                  key=lambda o: o.key)
  root = join_uri(bucket, prefix)
  found = []
  for folder, _, names in os.walk(root):
    for file_name in names:
      path = os.path.join(folder, file_name)
      key = prefix + os.path.relpath(path, root).replace(os.sep, "/")
      found.append(StoredObject(key, path, os.path.getsize(path)))
  return sorted(found, key=lambda o: o.key)


def sampled(key: str, offset: int, fraction: float) -> bool:
  """Whether a member is in the read_data sample: by a hash of where it
  is, so the same fraction picks the same members on every run."""
  if fraction >= 1:
    return True
  draw = int.from_bytes(hashlib.sha256(f"{key}:{offset}".encode()).digest()[:8],
                        "big")
  return draw < fraction * 2 ** 64


class Findings:
  """Problems found, by kind, and what was checked (shared by threads)."""

  def __init__(self):
    self.lock = threading.Lock()
    self.problems: Dict[str, List[Dict[str, Any]]] = {k: [] for k in KINDS}
    self.counts = {"objects_listed": 0, "objects_checked": 0,
                   "rows_checked": 0, "members_read": 0, "bytes_read": 0,
                   "member_bytes_read": 0, "input_files_checked": 0}

  def problem(self, kind: str, object_key: str = "", **facts: Any) -> None:
    with self.lock:
      self.problems[kind].append({"object": object_key, **facts})

  def add(self, **counts: int) -> None:
    with self.lock:
      for name, n in counts.items():
        self.counts[name] += n

  def snapshot(self) -> Dict[str, int]:
    with self.lock:
      return {**self.counts,
              "problems": sum(map(len, self.problems.values()))}

  def total(self) -> int:
    return self.snapshot()["problems"]


def _row_facts(row: Dict[str, Any]) -> Dict[str, Any]:
  return {"member": row["member"], "sop_instance_uid": row["sop_instance_uid"],
          "member_offset": row["member_offset"]}


def check_object(obj: Optional[StoredObject], rows: List[Dict[str, Any]],
                 findings: Findings, read_fraction: float = 0.0,
                 flagged: FrozenSet[str] = frozenset(),
                 gcs_client=None) -> None:
  """Every check of one object against its current rows (either may be
  missing)."""
  key = obj.key if obj else rows[0]["object"]
  findings.add(rows_checked=len(rows))
  if obj is None:
    findings.problem("missing_object", key, rows=len(rows),
                     uri=rows[0]["uri"])
    return
  findings.add(objects_checked=1)
  if key.endswith(PARTIAL_SUFFIX):
    findings.problem("partial_object", key, size=obj.size)
    return
  if not STUDY_OBJECT_KEY_PATTERN.match(key):
    findings.problem("unexpected_object", key, size=obj.size)
    return
  current = bool(rows)
  if not current:
    findings.problem("orphan_object", key, size=obj.size)
  elif _same_version(obj, rows, findings):
    for row in rows:
      if row["member_offset"] + row["member_length"] > obj.size:
        findings.problem("member_outside_object", key, size=obj.size,
                         **_row_facts(row))
  else:
    current = False   # another version: its members are not the rows'
  try:
    manifest = read_manifest(obj.uri, gcs_client)
  except RetrievalError as e:
    manifest = None
    if current:
      findings.problem("no_manifest", key, detail=str(e))
  if current and manifest is not None:
    _compare_manifest(key, manifest, rows, findings)
  if flagged:   # an orphan, or another version, may hold one too
    _check_flagged(key, manifest, rows, findings, flagged)
  if rows and read_fraction > 0:
    # Also when the version differs: the bytes say which images changed.
    _read_members(obj, rows, findings, read_fraction, gcs_client)


def _same_version(obj: StoredObject, rows, findings: Findings) -> bool:
  versions = {(r["generation"], r["size_bytes"], r["md5_hash"]) for r in rows}
  if len(versions) > 1:
    findings.problem("object_changed", obj.key,
                     detail=f"its current rows describe {len(versions)} "
                            "versions of it")
    return False
  generation, size, md5 = versions.pop()
  if obj.generation is not None and generation is not None:
    if obj.generation != generation:
      findings.problem("object_changed", obj.key,
                       detail=f"generation {obj.generation}, rows describe "
                              f"{generation}")
      return False
    return True
  if obj.size != size:
    findings.problem("object_changed", obj.key,
                     detail=f"{obj.size} bytes, rows describe {size}")
    return False
  have = obj.md5_base64 or base64.b64encode(
      file_digest(obj.uri, "md5").digest()).decode("ascii")
  findings.add(bytes_read=0 if obj.md5_base64 else obj.size)
  if have != md5:
    findings.problem("object_changed", obj.key,
                     detail=f"MD5 {have}, rows describe {md5}")
    return False
  return True


def _compare_manifest(key: str, manifest: dict, rows,
                      findings: Findings) -> None:
  members = {m["member_offset"]: m for m in manifest.get("members", [])}
  for row in rows:
    m = members.get(row["member_offset"])
    if m is None:
      findings.problem("row_without_member", key, **_row_facts(row))
      continue
    differ = [name for name, row_name in (
        ("member", "member"), ("sop_instance_uid", "sop_instance_uid"),
        ("sha256", "member_sha256"), ("member_length", "member_length"),
        ("size_bytes", "member_size_bytes")) if m[name] != row[row_name]]
    if differ:
      findings.problem("manifest_mismatch", key, differ=differ,
                       **_row_facts(row))
  with_rows = {row["member_offset"] for row in rows}
  for offset, m in members.items():
    if offset not in with_rows:
      findings.problem("member_without_row", key, member=m["member"],
                       sop_instance_uid=m["sop_instance_uid"],
                       member_offset=offset)


def _check_flagged(key: str, manifest: Optional[dict], rows,
                   findings: Findings, flagged: FrozenSet[str]) -> None:
  """No member, as the manifest or a row says, holds a flagged file's
  bytes."""
  held = {(r["member_sha256"], r["member_offset"], r["member"]) for r in rows}
  if manifest is not None:
    held |= {(m["sha256"], m["member_offset"], m["member"])
             for m in manifest.get("members", [])}
  for sha256, offset, member in sorted(held):
    if sha256 in flagged:
      findings.problem("flagged_file_stored", key, sha256=sha256,
                       member=member, member_offset=offset)


def _read_members(obj: StoredObject, rows, findings: Findings,
                  fraction: float, gcs_client) -> None:
  by_offset = {r["member_offset"]: r for r in rows
               if sampled(obj.key, r["member_offset"], fraction)
               and r["member_offset"] + r["member_length"] <= obj.size}

  def found(member: Member, _name: str, content: bytes) -> None:
    findings.add(members_read=1, member_bytes_read=member.length)

  def unusable(member: Member, error: RetrievalError) -> None:
    findings.add(members_read=1, member_bytes_read=member.length)
    findings.problem("corrupt_member", obj.key, detail=str(error),
                     **_row_facts(by_offset[member.offset]))

  members = [Member(r["member_offset"], r["member_length"],
                    r["member_sha256"], r["member_size_bytes"])
             for r in by_offset.values()]
  for run in member_runs(members):
    try:
      findings.add(bytes_read=read_members(obj.uri, run, found, gcs_client,
                                           obj.generation, unusable))
    except Exception as e:  # pylint: disable=broad-except
      for member in run:
        findings.problem("corrupt_member", obj.key,
                         detail=f"cannot be read: {e}",
                         **_row_facts(by_offset[member.offset]))


def by_object(rows: Iterable[Dict[str, Any]]
              ) -> Iterator[Tuple[str, List[Dict[str, Any]]]]:
  """(object key, its rows) from rows ordered by object."""
  for key, group in itertools.groupby(rows, key=lambda r: r["object"]):
    yield key, list(group)


def merged(objects: List[StoredObject],
           rows: Iterator[Tuple[str, List[Dict[str, Any]]]]
           ) -> Iterator[Tuple[Optional[StoredObject], List[Dict[str, Any]]]]:
  """(object or None, its rows or []) for every key in either, in key
  order: a merge of two sorted streams."""
  objects_iter = iter(objects)
  obj = next(objects_iter, None)
  group = next(rows, None)
  while obj is not None or group is not None:
    if group is None or (obj is not None and obj.key < group[0]):
      yield obj, []
      obj = next(objects_iter, None)
    elif obj is None or group[0] < obj.key:
      yield None, group[1]
      group = next(rows, None)
    else:
      yield obj, group[1]
      obj, group = next(objects_iter, None), next(rows, None)


def verify_collection(objects: List[StoredObject],
                      rows: Iterable[Dict[str, Any]], findings: Findings,
                      read_fraction: float = 0.0,
                      flagged: FrozenSet[str] = frozenset(),
                      workers: int = DEFAULT_WORKERS,
                      gcs_client=None) -> None:
  """Checks every object and every current row, workers objects at a
  time; at most 2 x workers objects' rows held at once."""
  findings.add(objects_listed=len(objects))
  slots = threading.BoundedSemaphore(2 * workers)

  def one(obj, group):
    try:
      check_object(obj, group, findings, read_fraction, flagged, gcs_client)
    except Exception as e:  # pylint: disable=broad-except
      findings.problem("no_manifest" if obj else "missing_object",
                       obj.key if obj else group[0]["object"],
                       detail=f"could not be checked: {type(e).__name__}: {e}")
    finally:
      slots.release()

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = []
    for obj, group in merged(objects, by_object(rows)):
      slots.acquire()
      futures.append(pool.submit(one, obj, group))
      futures = [f for f in futures if not f.done()]
    for future in futures:
      future.result()


def check_stored_inputs(listing: Iterable[Dict[str, str]], findings: Findings,
                        gcs_client=None) -> None:
  """Input files a run would keep stored where they are (one study
  object's lines of a plan's stored listing): each file's SHA-256 must be
  its member's, in the object's manifest."""
  lines = list(listing)
  if not lines:
    return
  uri = lines[0]["object"]
  try:
    manifest = read_manifest(uri, gcs_client)
  except RetrievalError as e:
    manifest = None
    reason = f"its study's object {uri} has no readable manifest: {e}"
  else:
    reason = f"its study's object {uri} does not exist"
  members = {} if manifest is None else {
      m["member"]: m["sha256"] for m in manifest.get("members", [])}
  for line in lines:
    findings.add(input_files_checked=1)
    if manifest is None:
      findings.problem("input_not_stored", _key(uri), path=line["path"],
                       member=line["member"], detail=reason)
      continue
    digest = file_digest(line["path"]).hexdigest()
    findings.add(bytes_read=os.path.getsize(line["path"])
                 if "://" not in line["path"] else 0)
    if members.get(line["member"]) != digest:
      findings.problem("input_not_stored", _key(uri), path=line["path"],
                       member=line["member"],
                       detail="the object's member is not this file's bytes"
                       if line["member"] in members else
                       "the object has no such member")


def _key(uri: str) -> str:
  at = uri.find("Collection/")
  return uri[at:] if at >= 0 else uri
