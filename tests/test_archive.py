"""The study archive writer, on in-memory streams and temporary folders."""
import dataclasses
import gzip
import io
import json
import shutil
import subprocess
import tarfile

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import GlobalWindow
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import local_pipeline
from invariants import read_member_at
from transforms import archive
from transforms.archive import write_study_archive
from transforms.archive_format import MANIFEST_NAME, StudyArchiveWriter
from transforms.records import (FAILED, HeaderPart, ImageRecord, SourceFile,
                                Study, pack_text)


def _study(tmp_path, contents):
  images = []
  for i, data in enumerate(contents):
    path = tmp_path / f"f{i}.dcm"
    path.write_bytes(data)
    images.append(ImageRecord(
        source=SourceFile(str(path), "E1", f"s/f{i}.dcm", len(data)),
        study_instance_uid="1.2", series_instance_uid="1.2.3",
        sop_instance_uid=f"1.2.3.{i}",
        header=HeaderPart(columns_json="{}", header_packed=pack_text("{}"))))
  return Study("E1", "1.2", "20200101", "A1",
               "Collection/C/Entity/E1/E1_20200101_A1.tar.gz", tuple(images))


def _write(study, level=2):
  out = io.BytesIO()
  members, sink = write_study_archive(study, out, level, opener=open_binary)
  return out.getvalue(), members, sink


def open_binary(path):
  return open(path, "rb")


CONTENTS = [b"DICM" * 1000, bytes(range(256)) * 3000, b"", b"x" * 511]


def test_archive_is_a_standard_tar_gz(tmp_path):
  data, members, _ = _write(_study(tmp_path, CONTENTS))
  with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as t:
    names = t.getnames()
    got = [t.extractfile(n).read() for n in names[:-1]]
  assert names[-1] == f"E1_20200101_A1/{MANIFEST_NAME}"
  assert names[:-1] == [m.member for m in members]
  assert got == CONTENTS
  path = tmp_path / "a.tar.gz"
  path.write_bytes(data)
  if shutil.which("gzip"):
    subprocess.run(["gzip", "-t", str(path)], check=True)
  if shutil.which("tar"):
    listed = subprocess.run(["tar", "tzf", str(path)], check=True,
                            capture_output=True, text=True).stdout.split()
    assert listed == names


def test_each_image_is_one_gzip_member_at_its_recorded_offset(tmp_path):
  data, members, _ = _write(_study(tmp_path, CONTENTS))
  for member, content in zip(members, CONTENTS):
    info, got = read_member_at(data, member.member_offset, member.member_length)
    assert info.name == member.member and got == content
  # The members tile the object: each starts where the previous ended.
  for a, b in zip(members, members[1:]):
    assert a.member_offset + a.member_length == b.member_offset


def test_manifest_lists_every_image(tmp_path):
  study = _study(tmp_path, CONTENTS)
  data, members, _ = _write(study)
  with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as t:
    manifest = json.load(t.extractfile(f"E1_20200101_A1/{MANIFEST_NAME}"))
  assert [m["sop_instance_uid"] for m in manifest["members"]] == [
      i.sop_instance_uid for i in study.images]
  assert [(m["member_offset"], m["member_length"], m["sha256"])
          for m in manifest["members"]] == [
              (m.member_offset, m.member_length, m.sha256) for m in members]


def test_archive_bytes_are_reproducible(tmp_path):
  a, _, sink_a = _write(_study(tmp_path, CONTENTS))
  b, _, sink_b = _write(_study(tmp_path, CONTENTS))
  assert a == b and sink_a.md5_base64() == sink_b.md5_base64()
  with tarfile.open(fileobj=io.BytesIO(a), mode="r:gz") as t:
    assert {(m.mtime, m.uid, m.gid, m.mode, m.uname) for m in t} == {
        (0, 0, 0, 0o644, "")}
  assert gzip.decompress(a)  # gzip header mtime 0 is checked by equality


def test_a_file_that_changed_size_fails_the_study(tmp_path):
  study = _study(tmp_path, [b"abc"])
  (tmp_path / "f0.dcm").write_bytes(b"ab")
  with pytest.raises(IOError, match="shrank"):
    _write(study)
  (tmp_path / "f0.dcm").write_bytes(b"abcd")
  with pytest.raises(IOError, match="grew"):
    _write(study)


def test_sink_reports_md5_and_crc32c_like_cloud_storage(tmp_path):
  out = io.BytesIO()
  writer = StudyArchiveWriter(out)
  writer.close(*writer.add_bytes("x", b"hello"))
  import base64, hashlib, google_crc32c
  data = out.getvalue()
  assert writer.sink.md5_base64() == base64.b64encode(
      hashlib.md5(data).digest()).decode()
  assert writer.sink.crc32c_base64() == base64.b64encode(
      google_crc32c.value(data).to_bytes(4, "big")).decode()


def test_the_manifest_is_found_from_the_last_bytes(tmp_path):
  from transforms.archive_format import INDEX_TAIL_BYTES, find_manifest
  data, _, _ = _write(_study(tmp_path, CONTENTS))
  offset, length = find_manifest(data[-INDEX_TAIL_BYTES:])
  info, raw = read_member_at(data, offset, length)
  assert info.name.endswith("/manifest.json")
  assert len(json.loads(raw)["members"]) == len(CONTENTS)
  assert offset + length < len(data) <= offset + length + INDEX_TAIL_BYTES


def test_threads_and_streamed_large_files_give_the_same_bytes(tmp_path,
                                                              monkeypatch):
  import random
  import transforms.archive as archive
  rng = random.Random(7)
  contents = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(4000)))
              + b"\0" * rng.randrange(60000) for _ in range(40)]
  study = _study(tmp_path, contents)
  as_made = io.BytesIO()   # these files are all compressed by the caller
  write_study_archive(study, as_made, 2, opener=open_binary)
  one = io.BytesIO()       # all by one pool thread
  monkeypatch.setattr(archive, "INLINE_MEMBER_BYTES", 0)
  write_study_archive(study, one, 2, opener=open_binary, threads=1)
  # Files under 20 kB compressed by the writing thread, then several
  # threads, a small in-flight budget, and files over 40 kB streamed by the
  # writing thread: in whatever order members finish, same object.
  monkeypatch.setattr(archive, "INLINE_MEMBER_BYTES", 20000)
  monkeypatch.setattr(archive, "PARALLEL_MEMBER_BYTES", 40000)
  monkeypatch.setattr(archive, "IN_FLIGHT_BYTES", 50000)
  many = io.BytesIO()
  members, _ = write_study_archive(study, many, 2, opener=open_binary,
                                   threads=4)
  assert many.getvalue() == one.getvalue() == as_made.getvalue()
  # Every path taken, and a file for the caller right after one in a
  # thread: it waits for that one.
  paths = "".join("S" if len(c) < 20000 else "T" if len(c) <= 40000 else "L"
                  for c in contents)
  assert "TS" in paths and "L" in paths
  assert [m.sop_instance_uid for m in members] == [
      i.sop_instance_uid for i in study.images]
  with tarfile.open(fileobj=io.BytesIO(many.getvalue()), mode="r:gz") as t:
    assert [t.extractfile(m.member).read() for m in members] == contents


def test_a_forked_process_compresses_with_a_pool_of_its_own(tmp_path):
  """The compression pool is made once per process; a process forked after
  it was made (without its threads) makes its own instead of waiting on
  threads that do not exist there."""
  import multiprocessing
  from transforms.archive import compression_pool
  parent = compression_pool(2)
  assert compression_pool(2) is parent
  assert parent.submit(sum, [1, 2]).result(timeout=10) == 3
  context = multiprocessing.get_context("fork")
  with context.Pool(1) as children:
    assert children.apply_async(_sum_in_pool).get(timeout=30) == 3


def _sum_in_pool():
  from transforms.archive import compression_pool
  return compression_pool(2).submit(sum, [1, 2]).result(timeout=10)


@settings(max_examples=300, deadline=None)
@given(name=st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1,
            max_size=120),
    st.text(min_size=1, max_size=60),                  # any Unicode
    st.sampled_from(["a" * 99, "a" * 100, "a" * 101, "d/" * 50, "é" * 50])),
       size=st.one_of(st.integers(0, 10 ** 7),
                      st.sampled_from([8 ** 11 - 1, 8 ** 11, 8 ** 12 + 5])))
def test_tar_headers_are_tarfiles_bytes(name, size):
  """The header made directly is byte for byte tarfile's, whatever the name
  (long ones and non-ASCII ones go through tarfile and get a pax header)."""
  from transforms.archive_format import _tarfile_header, tar_header
  assert tar_header(name, size) == _tarfile_header(name, size)


def _named_study(tmp_path, name, contents):
  folder = tmp_path / name
  folder.mkdir()
  study = _study(folder, contents)
  return dataclasses.replace(
      study, study_instance_uid=f"1.{name}", item_id=name,
      object_key=f"Collection/C/Entity/E1/E1_20200101_{name}.tar.gz",
      input_bytes=sum(len(c) for c in contents))


def test_a_bundles_large_studies_are_written_after_its_small_ones(
    tmp_path, monkeypatch):
  """A large study is written when its bundle ends (its members take every
  core), after the small studies that came after it; what a failed one
  gives is as when written at once, in the global window."""
  monkeypatch.setattr(archive, "LARGE_STUDY_BYTES", 1000)
  large = _named_study(tmp_path, "L", [b"x" * 2000])
  small = _named_study(tmp_path, "S", [b"y" * 10])
  broken = _named_study(tmp_path, "B", [b"z" * 2000])
  (tmp_path / "B" / "f0.dcm").write_bytes(b"z" * 1999)   # changed size
  bucket = tmp_path / "bucket"
  dofn = archive._WriteStudyArchive(str(bucket), 2, False)  # pylint: disable=protected-access
  dofn.setup()
  dofn.start_bundle()
  assert list(dofn.process(large)) == []
  assert [s.study.object_key for s in dofn.process(small)] == [
      small.object_key]
  assert list(dofn.process(broken)) == []
  assert not (bucket / large.object_key).exists()
  ended = list(dofn.finish_bundle())
  assert [w.windows for w in ended[:1]] == [(GlobalWindow(),)]
  assert ended[0].value.study.object_key == large.object_key
  assert (bucket / large.object_key).exists()
  failed, = ended[1:]
  assert failed.tag == archive.EXCLUDED_TAG
  assert failed.value.windows == (GlobalWindow(),)
  assert failed.value.value.status == FAILED
  assert "B/f0.dcm" in failed.value.value.path
  dofn.start_bundle()
  assert list(dofn.finish_bundle()) == []   # nothing left from a bundle


def test_large_and_small_studies_are_all_stored_by_the_transform(
    tmp_path, monkeypatch):
  monkeypatch.setattr(archive, "LARGE_STUDY_BYTES", 1000)
  studies = [_named_study(tmp_path, "L", [b"x" * 2000]),
             _named_study(tmp_path, "S", [b"y" * 10])]
  with local_pipeline() as p:
    written = (p | beam.Create(studies)
               | archive.WriteStudyArchive(str(tmp_path / "bucket")))
    assert_that(written.stored | beam.Map(lambda s: s.study.object_key),
                equal_to([s.object_key for s in studies]))
