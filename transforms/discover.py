"""Find the input files: one folder per entity under each input root.

Listing goes through Beam's FileSystems, so local folders and gs:// prefixes
take the same path. A Reshuffle after listing breaks fusion, so that the
files of one large root spread over all workers; files cross it in batches,
since the local runner's driver holds every element of a shuffle, decoded.
"""

import functools
import json
import logging
import os
import re
from typing import (Dict, Iterable, Iterator, List, Optional, Sequence,
                    Tuple, Union)

import apache_beam as beam
from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems

from transforms.keys import UnsafeKeyComponent, check_key_component
from transforms.once import Once
from transforms.progress import Count
from transforms.records import REJECTED, Excluded, SourceFile

EXCLUDED_TAG = "excluded"
_GLOB_CHARS = set("*?[")
FILES_PER_BATCH = 64


class InputError(ValueError):
  """An input root that cannot be used; raised before any work."""


def split_input_roots(value: str) -> List[str]:
  """--input accepts one root or a comma-separated list of roots/globs."""
  roots = [r.strip().rstrip("/") for r in (value or "").split(",") if r.strip()]
  if not roots:
    raise InputError("--input names no folder")
  for root in roots:
    if "**" in root:
      raise InputError(
          f"--input {root!r}: '**' is not allowed; a root's own depth must be "
          "fixed so that the entity folder directly below it is known")
  return roots


def check_input_roots(roots: Sequence[str]) -> None:
  """Fails fast when a root is unreadable or holds no file at all."""
  for root in roots:
    try:
      found = FileSystems.match([root + "/**"], limits=[1])[0].metadata_list
    except Exception as e:  # pylint: disable=broad-except
      raise InputError(f"--input {root!r} cannot be listed: {e}") from e
    if not found:
      raise InputError(f"--input {root!r} holds no files (or does not exist)")


def source_file_for(root: str, path: str, size_bytes: int,
                    version: str = "") -> SourceFile:
  """Splits a listed path into entity id and path below the entity folder.

  The root may be a glob; its number of path components is what matters.
  Raises UnsafeKeyComponent for a file outside any entity folder or under
  an entity folder whose name cannot be part of an object key.
  """
  depth = len(root.rstrip("/").split("/"))
  parts = path.split("/")
  if len(parts) <= depth + 1:
    raise UnsafeKeyComponent("file lies directly in the input root, not "
                             "inside an entity folder")
  entity_id = check_key_component(parts[depth], "entity folder name")
  return SourceFile(path=path, entity_id=entity_id,
                    relpath="/".join(parts[depth + 1:]), size_bytes=size_bytes,
                    version=version)


# The same few roots, resolved once per worker instead of once per file.
_realpath_of_root = functools.lru_cache(maxsize=64)(os.path.realpath)


def check_inside_root(root: str, path: str,
                      folders: Optional[Dict[str, bool]] = None) -> None:
  """A local file must resolve to a place inside its root: a symbolic link
  pointing elsewhere is never followed (Cloud Storage has no links).
  folders: whether each folder below the root is a link, as found for the
  files listed before this one in the same listing (filled in here)."""
  if FileSystems.get_scheme(path) not in (None, "file"):
    return
  depth = len(root.rstrip("/").split("/"))
  parts = path.split("/")
  # Only a link below the root can lead out of it; without one, the file is
  # where its path says. Checking those few steps costs a fraction of
  # resolving the whole path, for every file; the folders, shared by the
  # files of a listing, are checked once per listing.
  place = "/".join(parts[:depth])
  for part in parts[depth:-1]:
    place += "/" + part
    if _folder_is_link(place, folders):
      break
  else:
    if not os.path.islink(path):
      return
  root_dir = _realpath_of_root("/".join(parts[:depth]))
  target = os.path.realpath(path)
  if os.path.commonpath([root_dir, target]) != root_dir:
    raise UnsafeKeyComponent(
        "symbolic link points outside the input root; not followed")


def listing_patterns(roots: Sequence[str],
                     entities: Optional[Sequence[str]] = None
                     ) -> List[Tuple[str, str]]:
  """(root, glob) pairs: everything below each root, or only the named
  entity folders below it."""
  if entities is None:
    return [(root, root + "/**") for root in roots]
  return [(root, f"{root}/{entity}/**") for root in roots for entity in entities]


def list_files(pattern: str) -> Iterator[Tuple[str, int, str]]:
  """(path, size, version) of every file matching a glob: on Cloud Storage
  from the bucket's listing (version: the object's generation), on a local
  disk as LocalFileSystem lists (version: the modification time in
  nanoseconds), elsewhere through FileSystems."""
  wanted = re.compile(FileSystem.translate_pattern(pattern))
  glob_at = min([pattern.find(c) for c in _GLOB_CHARS if c in pattern]
                + [len(pattern)])
  if pattern.startswith("gs://"):
    from transforms.gcs import split_gs_uri, storage_client
    bucket, prefix = split_gs_uri(pattern[:glob_at])
    for blob in storage_client().list_blobs(bucket, prefix=prefix):
      path = f"gs://{bucket}/{blob.name}"
      if wanted.match(path) and not blob.name.endswith("/"):
        yield path, blob.size, f"generation:{blob.generation}"
    return
  if FileSystems.get_scheme(pattern) is None:
    # What LocalFileSystem's match does (every file below the folder of the
    # pattern's fixed prefix, linked folders not followed, kept when it
    # matches), with one stat per file where it makes three.
    for folder, _, names in os.walk(os.path.dirname(pattern[:glob_at])):
      for name in names:
        path = os.path.join(folder, name)
        if wanted.match(path):
          try:
            found = os.stat(path)
          except OSError:   # gone since listed
            continue
          yield path, found.st_size, f"mtime_ns:{found.st_mtime_ns}"
    return
  for result in FileSystems.match([pattern]):
    for meta in result.metadata_list:
      try:
        version = f"mtime_ns:{os.stat(meta.path).st_mtime_ns}"
      except OSError:   # not a local path: the store's modification time
        version = f"updated:{meta.last_updated_in_seconds}"
      yield meta.path, meta.size_in_bytes, version


class _ListRoot(beam.DoFn):
  """Lists every file matching one (root, glob) pair: (root, JSON text of
  up to FILES_PER_BATCH [path, size, version] lists) per batch, one short
  string where a tuple per file took ~0.5 kB in the driver."""

  def __init__(self):
    self.listed = Count("files_listed")
    self.bytes_listed = Count("bytes_listed")
    self.done = Count("listings_done")

  def process(self, root_and_pattern: Tuple[str, str]
              ) -> Iterable[Tuple[str, str]]:
    root, pattern = root_and_pattern
    batch = []
    for path, size, version in list_files(pattern):
      self.listed.inc()
      self.bytes_listed.inc(size)
      batch.append((path, size, version))
      if len(batch) == FILES_PER_BATCH:
        yield root, json.dumps(batch)
        batch = []
    if batch:
      yield root, json.dumps(batch)
    self.done.inc()


def _unbatch(root: str, batch: str) -> Iterable[Tuple[str, str, int, str]]:
  for path, size_bytes, version in json.loads(batch):
    yield root, path, size_bytes, version


def _folder_is_link(place: str, folders: Optional[Dict[str, bool]]) -> bool:
  if folders is None:
    return os.path.islink(place)
  found = folders.get(place)
  if found is None:
    found = folders[place] = os.path.islink(place)
  return found


def to_source_file(root: str, path: str, size_bytes: int, version: str,
                   folders: Optional[Dict[str, bool]] = None
                   ) -> Union[SourceFile, Excluded]:
  """A listed file as a SourceFile, or Excluded (rejected) with the reason
  it cannot be one: outside any entity folder, an entity name unfit for a
  key, a link out of the root. folders: as check_inside_root's."""
  try:
    source = source_file_for(root, path, size_bytes, version)
    check_inside_root(root, path, folders)
    return source
  except UnsafeKeyComponent as e:
    parts = path[len(root):].strip("/").split("/")
    entity = parts[0] if len(parts) > 1 else ""
    return Excluded(path, entity, REJECTED, str(e))


def list_input(roots: Sequence[str], entities: Optional[Sequence[str]] = None
               ) -> Iterator[Union[SourceFile, Excluded]]:
  """Every input file, listed in this process (what DiscoverEntityFiles
  does on workers): a SourceFile, or Excluded when rejected."""
  folders: Dict[str, bool] = {}
  for root, pattern in listing_patterns(roots, entities):
    for path, size_bytes, version in list_files(pattern):
      yield to_source_file(root, path, size_bytes, version, folders)


class _ToSourceFile(beam.DoFn):
  def __init__(self):
    self.rejected = Count("files_rejected")
    self.folders: Dict[str, bool] = {}

  def start_bundle(self):
    self.folders = {}   # what one bundle of a listing found, no longer

  def process(self, listed: Tuple[str, str, int, str]
              ) -> Iterable[SourceFile]:
    found = to_source_file(*listed, self.folders)
    if isinstance(found, SourceFile):
      yield found
    else:
      self.rejected.inc()
      yield beam.pvalue.TaggedOutput(EXCLUDED_TAG, found)


class DiscoverEntityFiles(beam.PTransform):
  """Input roots -> SourceFile per file (main) and Excluded ('excluded')."""

  def __init__(self, roots: Sequence[str],
               entities: Optional[Sequence[str]] = None):
    super().__init__()
    self.roots = list(roots)
    self.entities = None if entities is None else list(entities)

  def expand(self, pbegin):
    listed = (
        pbegin
        | "Roots" >> Once(listing_patterns(self.roots, self.entities))
        # One root (an entity's folder) per worker, as they come.
        | "SpreadRoots" >> beam.Reshuffle()
        | "ListRoot" >> beam.ParDo(_ListRoot())
        # Listing runs on one worker; spread the files over all of them.
        | "SpreadFiles" >> beam.Reshuffle()
        | "Unbatch" >> beam.FlatMapTuple(_unbatch))
    logging.info("Listing input roots: %s", ", ".join(self.roots))
    return listed | "ToSourceFile" >> beam.ParDo(_ToSourceFile()).with_outputs(
        EXCLUDED_TAG, main="files")
