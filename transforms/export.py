"""A researcher's cohort out of the bucket: the images that current rows
select, as verified DICOM files in a folder.

Rows come ordered by object and member offset, so that each study object's
selected images are planned together: members that are adjacent (or close,
retrieve.READ_GAP_BYTES) are read in one request, their bytes cut into
images as they arrive. Objects are read in parallel, at most `workers` at a
time, and rows are taken from the query only as objects are handed out:
memory does not grow with the cohort. Every image is checked against its
row's SHA-256 and size before it is written, under a temporary name that is
renamed when complete; a file already present with the right hash is not
read again. An image that cannot be had is listed with its reason, and the
others are still exported.
"""

import concurrent.futures
import csv
import dataclasses
import itertools
import os
import threading
from typing import Any, Dict, Iterable, List, Optional, Tuple

from transforms.archive_format import RetrievalError
from transforms.crash import crash_point
from transforms.files import file_digest
from transforms.keys import UnsafeKeyComponent, check_key_component
from transforms.retrieve import Member, member_runs, read_members

# The columns a selection query returns, as BigQuery and local SQL both
# name them.
SELECTED_COLUMNS = (
    "entity_id, study_instance_uid, series_instance_uid, sop_instance_uid, "
    "source_path, storage.uri AS uri, storage.member_offset AS member_offset, "
    "storage.member_length AS member_length, "
    "storage.member_sha256 AS member_sha256, "
    "storage.member_size_bytes AS member_size_bytes, "
    "storage.generation AS generation")
LAYOUTS = ("uid", "member")
MANIFEST = "manifest.csv"
FAILED = "failed.csv"
PARTIAL_SUFFIX = ".exporting"
MANIFEST_COLUMNS = ("path", "entity_id", "study_instance_uid",
                    "series_instance_uid", "sop_instance_uid", "size_bytes",
                    "sha256", "object_uri", "member_offset", "member_length")
DEFAULT_WORKERS = 8


@dataclasses.dataclass(frozen=True)
class Selected:
  """One selected image: who it is, where it lies, what it must be."""
  entity_id: str
  study_instance_uid: str
  series_instance_uid: Optional[str]
  sop_instance_uid: str
  source_path: str
  uri: str
  member_offset: int
  member_length: int
  sha256: str
  size_bytes: int
  generation: Optional[int] = None

  @classmethod
  def of(cls, row: Dict[str, Any]) -> "Selected":
    return cls(row["entity_id"], row["study_instance_uid"],
               row.get("series_instance_uid"), row["sop_instance_uid"],
               row["source_path"], row["uri"], int(row["member_offset"]),
               int(row["member_length"]), row["member_sha256"],
               int(row["member_size_bytes"]),
               None if row.get("generation") is None
               else int(row["generation"]))

  @property
  def member(self) -> Member:
    return Member(self.member_offset, self.member_length, self.sha256,
                  self.size_bytes)


def selection_sql(table: str, where: Optional[str] = None,
                  sql: Optional[str] = None) -> str:
  """The query for a cohort: current rows (table: the current view) that
  the condition selects, or whose SOP instance a query returns; ordered
  by object and member, so that each object's images come together."""
  if where:
    selected = f"SELECT {SELECTED_COLUMNS} FROM {table} WHERE {where}"
  else:
    inner = sql.strip().rstrip(";")
    selected = (f"SELECT {SELECTED_COLUMNS} FROM {table} WHERE "
                f"sop_instance_uid IN (SELECT sop_instance_uid FROM "
                f"({inner}))")
  return f"{selected}\nORDER BY uri, member_offset"


def count_sql(selection: str) -> str:
  body = selection.rsplit("\nORDER BY", 1)[0]
  return (f"SELECT COUNT(*) AS images, SUM(member_size_bytes) AS bytes "
          f"FROM ({body})")


def relative_path(image: Selected, layout: str) -> str:
  """Where an image goes below the output folder: by UIDs
  (<entity>/<study>/<series>/<sop>.dcm), or (layout 'member') at its
  original path below its entity. Raises UnsafeKeyComponent for a part
  that could leave the folder."""
  parts = [image.entity_id]
  if layout == "member":
    parts += image.source_path.split("/")
  else:
    parts += [image.study_instance_uid, image.series_instance_uid or
              "no-series", image.sop_instance_uid + ".dcm"]
  for part in parts:
    check_key_component(part, "path component")
  return "/".join(parts)


def already_exported(path: str, image: Selected) -> bool:
  try:
    return (os.path.getsize(path) == image.size_bytes
            and file_digest(path).hexdigest() == image.sha256)
  except OSError:
    return False


def write_atomically(path: str, content: bytes) -> None:
  """The file appears under its name only when whole (rename)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  partial = path + PARTIAL_SUFFIX
  with open(partial, "wb") as f:
    f.write(content)
  crash_point("export_partial")
  os.replace(partial, path)


def remove_partials(out: str) -> int:
  """Files a killed export left half written: removed, to be written
  again."""
  removed = 0
  for folder, _, names in os.walk(out):
    for name in names:
      if name.endswith(PARTIAL_SUFFIX):
        os.unlink(os.path.join(folder, name))
        removed += 1
  return removed


class ExportStats:
  """What an export has done so far (shared by its threads)."""

  def __init__(self, images: int = 0, size: int = 0):
    self.lock = threading.Lock()
    self.images, self.bytes = images, size
    self.exported = self.present = self.failed = 0
    self.bytes_done = self.bytes_read = self.member_bytes = self.requests = 0

  def add(self, **counts: int) -> None:
    with self.lock:
      for name, n in counts.items():
        setattr(self, name, getattr(self, name) + n)

  def snapshot(self) -> Dict[str, int]:
    with self.lock:
      return {k: v for k, v in vars(self).items() if k != "lock"}


def _export_object(uri: str, images: List[Selected], out: str, layout: str,
                   stats: ExportStats, gcs_client
                   ) -> List[Tuple[Selected, str]]:
  """Exports one object's selected images; returns (image, reason) of each
  that could not be had."""
  failures, wanted = [], {}
  for image in images:
    try:
      path = os.path.join(out, relative_path(image, layout))
    except UnsafeKeyComponent as e:
      failures.append((image, f"cannot be named: {e}"))
      continue
    if already_exported(path, image):
      stats.add(present=1, bytes_done=image.size_bytes)
    else:
      wanted[image.member_offset] = (image, path)

  def found(member: Member, _name: str, content: bytes) -> None:
    image, path = wanted.pop(member.offset)
    write_atomically(path, content)
    stats.add(exported=1, bytes_done=len(content), member_bytes=member.length)

  def unusable(member: Member, error: RetrievalError) -> None:
    failures.append((wanted.pop(member.offset)[0], str(error)))

  generation = images[0].generation
  for run in member_runs([image.member for image, _ in wanted.values()]):
    try:
      stats.add(requests=1, bytes_read=read_members(
          uri, run, found, gcs_client, generation, unusable))
    except Exception as e:  # pylint: disable=broad-except
      reason = _reason(uri, generation, e)
      for member in run:
        if member.offset in wanted:
          failures.append((wanted.pop(member.offset)[0], reason))
  for image, _ in failures:
    stats.add(failed=1, bytes_done=image.size_bytes)
  return failures


def _reason(uri: str, generation: Optional[int], error: Exception) -> str:
  """Why an image could not be had, in words that say what to do."""
  code = getattr(error, "code", None)
  if isinstance(error, FileNotFoundError) or code == 404 or (
      type(error).__name__ == "NotFound"):
    return (f"object {uri}" + (f" (generation {generation})" if generation
                               else "") + " is gone: deleted or replaced "
            "since its rows were written")
  if code == 403 or type(error).__name__ == "Forbidden":
    return (f"permission denied reading {uri}: the identity needs "
            "roles/storage.objectViewer on the bucket")
  if isinstance(error, RetrievalError):
    return str(error)
  return f"{type(error).__name__}: {error}"


def export_cohort(rows: Iterable[Dict[str, Any]], out: str, layout: str,
                  stats: ExportStats, workers: int = DEFAULT_WORKERS,
                  gcs_client=None) -> Tuple[int, List[Tuple[Selected, str]]]:
  """Exports the selected rows (ordered by object) into out, writing
  manifest.csv (every image exported or already there, in the query's
  order) and, when some could not be had, failed.csv. Returns (images in
  the manifest, failures)."""
  os.makedirs(out, exist_ok=True)
  remove_partials(out)
  listing = os.path.join(out, MANIFEST + PARTIAL_SUFFIX)
  failures: List[Tuple[Selected, str]] = []
  slots = threading.BoundedSemaphore(2 * workers)

  def one_object(uri, images):
    try:
      return _export_object(uri, images, out, layout, stats, gcs_client)
    finally:
      slots.release()

  with open(listing, "w", newline="", encoding="utf-8") as f, \
      concurrent.futures.ThreadPoolExecutor(workers) as pool:
    writer = csv.writer(f)
    writer.writerow(MANIFEST_COLUMNS)
    futures = []
    for uri, group in itertools.groupby(map(Selected.of, rows),
                                        key=lambda s: s.uri):
      images = list(group)
      for image in images:
        writer.writerow(_manifest_line(image, layout))
      for part in _parts(images):
        slots.acquire()   # rows are taken only as objects are handed out
        futures.append(pool.submit(one_object, uri, part))
      done = [f for f in futures if f.done()]
      futures = [f for f in futures if not f.done()]
      for future in done:
        failures.extend(future.result())
    for future in futures:
      failures.extend(future.result())
  listed = _finish_manifest(listing, out, {(i.uri, i.member_offset)
                                           for i, _ in failures})
  _write_failures(out, failures)
  return listed, failures


# An object's images are handed out in parts of at most this many
# compressed bytes, so that the images of one large study are read by
# several threads at once (a request per run of adjacent members in each).
PART_BYTES = 32 << 20


def _parts(images: List[Selected]) -> Iterable[List[Selected]]:
  part, size = [], 0
  for image in sorted(images, key=lambda i: i.member_offset):
    if part and size + image.member_length > PART_BYTES:
      yield part
      part, size = [], 0
    part.append(image)
    size += image.member_length
  if part:
    yield part


def _manifest_line(image: Selected, layout: str) -> List[Any]:
  try:
    path = relative_path(image, layout)
  except UnsafeKeyComponent:
    path = ""
  return [path, image.entity_id, image.study_instance_uid,
          image.series_instance_uid or "", image.sop_instance_uid,
          image.size_bytes, image.sha256, image.uri, image.member_offset,
          image.member_length]


def _finish_manifest(listing: str, out: str, failed: set) -> int:
  """manifest.csv from the listing written as rows came, without the
  images that could not be had."""
  final = os.path.join(out, MANIFEST)
  kept = 0
  with open(listing, newline="", encoding="utf-8") as src, \
      open(final + ".tmp", "w", newline="", encoding="utf-8") as dst:
    reader, writer = csv.reader(src), csv.writer(dst)
    writer.writerow(next(reader))
    for line in reader:
      if (line[7], int(line[8])) not in failed:
        writer.writerow(line)
        kept += 1
  os.replace(final + ".tmp", final)
  os.unlink(listing)
  return kept


def _write_failures(out: str, failures: List[Tuple[Selected, str]]) -> None:
  path = os.path.join(out, FAILED)
  if not failures:
    if os.path.exists(path):
      os.unlink(path)   # from an earlier run that could not have them all
    return
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(("sop_instance_uid", "entity_id", "object_uri",
                     "member_offset", "reason"))
    for image, reason in sorted(failures, key=lambda x: (x[0].uri,
                                                         x[0].member_offset)):
      writer.writerow((image.sop_instance_uid, image.entity_id, image.uri,
                       image.member_offset, reason))
