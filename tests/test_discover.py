import os

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from conftest import local_pipeline
from transforms.discover import (DiscoverEntityFiles, InputError,
                                 check_input_roots, check_inside_root,
                                 list_files, split_input_roots)
from transforms.keys import UnsafeKeyComponent
from transforms.records import REJECTED, Excluded, SourceFile


def _tree(root):
  for rel in ["E1/a/b/x.dcm", "E1/y.dcm", "E2/z.dcm", "top.dcm", "E 3/w.dcm"]:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"12345")


def test_files_are_split_into_entity_and_path(tmp_path):
  _tree(tmp_path / "r")
  root = str(tmp_path / "r")
  with local_pipeline() as p:
    found = p | DiscoverEntityFiles([root])
    # Each with its listing facts: size, and the file's mtime in ns.
    version = lambda rel: f"mtime_ns:{os.stat(f'{root}/{rel}').st_mtime_ns}"  # noqa: E731
    assert_that(found.files, equal_to([
        SourceFile(f"{root}/{rel}", rel.split("/")[0], rel.split("/", 1)[1],
                   5, version(rel))
        for rel in ("E1/a/b/x.dcm", "E1/y.dcm", "E2/z.dcm", "E 3/w.dcm")]),
        label="files")
    assert_that(found.excluded, equal_to([Excluded(
        f"{root}/top.dcm", "", REJECTED,
        "file lies directly in the input root, not inside an entity folder")]),
        label="excluded")


def test_globbed_roots_keep_their_depth(tmp_path):
  for day in ("2024-01-01", "2024-01-02"):
    _tree(tmp_path / day)
  with local_pipeline() as p:
    found = p | DiscoverEntityFiles([str(tmp_path / "2024-*")])
    entities = found.files | beam.Map(lambda f: (f.entity_id, f.relpath))
    assert_that(entities, equal_to(
        [("E1", "a/b/x.dcm"), ("E1", "y.dcm"), ("E2", "z.dcm"),
         ("E 3", "w.dcm")] * 2))


def test_split_input_roots():
  assert split_input_roots("/a, gs://b/c/ ,/d*") == ["/a", "gs://b/c", "/d*"]
  with pytest.raises(InputError):
    split_input_roots(" , ")
  with pytest.raises(InputError, match=r"\*\*"):
    split_input_roots("/a/**")


def test_check_input_roots(tmp_path):
  _tree(tmp_path / "r")
  check_input_roots([str(tmp_path / "r")])
  (tmp_path / "empty").mkdir()
  for bad in ("empty", "missing"):
    with pytest.raises(InputError, match="holds no files"):
      check_input_roots([str(tmp_path / bad)])


def test_an_entity_list_limits_the_listing(tmp_path):
  _tree(tmp_path / "r")
  root = str(tmp_path / "r")
  with local_pipeline() as p:
    found = p | DiscoverEntityFiles([root], entities=["E2", "E9"])
    assert_that(found.files | beam.Map(lambda f: f.path),
                equal_to([f"{root}/E2/z.dcm"]))


def test_check_inside_root_follows_only_links_below_the_root(tmp_path):
  outside = tmp_path / "outside"
  (outside / "d").mkdir(parents=True)
  (outside / "d" / "secret.dcm").write_bytes(b"x")
  real_root = tmp_path / "real_root"
  (real_root / "E" / "s").mkdir(parents=True)
  (real_root / "E" / "s" / "a.dcm").write_bytes(b"x")
  os.symlink(outside / "d", real_root / "E" / "dir_out")
  os.symlink(outside / "d" / "secret.dcm", real_root / "E" / "s" / "file_out")
  os.symlink(real_root / "E" / "s", real_root / "E" / "dir_in")
  os.symlink(real_root, tmp_path / "root_link")   # the root itself via a link
  # Alone, and with the folders of one listing checked once (the same
  # answers, whatever was checked before).
  for folders in (None, {}):
    for root in (str(real_root), str(tmp_path / "root_link")):
      check_inside_root(root, f"{root}/E/s/a.dcm", folders)
      check_inside_root(root, f"{root}/E/dir_in/a.dcm", folders)
      for escaping in ("E/dir_out/secret.dcm", "E/s/file_out"):
        with pytest.raises(UnsafeKeyComponent, match="outside the input root"):
          check_inside_root(root, f"{root}/{escaping}", folders)
      check_inside_root(root, f"{root}/E/s/a.dcm", folders)
  assert folders[f"{real_root}/E/dir_out"] and not folders[f"{real_root}/E/s"]


def test_a_local_listing_is_what_beams_match_lists(tmp_path):
  """list_files walks a local disk itself (one stat per file): the same
  files, sizes and versions as FileSystems.match, links, hidden files and
  globbed roots included."""
  from apache_beam.io.filesystems import FileSystems
  root = tmp_path / "in"
  for rel in ("A/s1/a.dcm", "A/.hidden", "B/DICOM/I0001", "B/deep/x/y/z.dcm",
              "C[1]/a.dcm", "top.dcm"):
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(rel.encode())
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "secret.dcm").write_bytes(b"s")
  os.symlink(tmp_path / "out" / "secret.dcm", root / "A" / "file_link")
  os.symlink(tmp_path / "out", root / "A" / "folder_link")
  os.symlink(tmp_path / "out" / "missing", root / "A" / "dangling")
  for pattern in (f"{root}/**", f"{root}/A/**", f"{tmp_path}/i*/B/**",
                  f"{tmp_path}/nowhere/**"):
    by_beam = sorted(
        (m.path, m.size_in_bytes, f"mtime_ns:{os.stat(m.path).st_mtime_ns}")
        for result in FileSystems.match([pattern])
        for m in result.metadata_list)
    assert sorted(list_files(pattern)) == by_beam, pattern
  assert f"{root}/A/file_link" in {p for p, _, _ in list_files(f"{root}/**")}
