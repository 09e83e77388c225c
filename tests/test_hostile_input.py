"""Messy input: every bad file gets a clear reason, nothing good is lost,
and a flagged image never leaves, whatever the tree looks like."""
from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import pydicom
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from conftest import read_rows, run_pipeline
from devtools.sample_data import fresh_uid
from invariants import check_run, sha256
from transforms.report import read_stored_listing
from transforms.schema import row_errors

CT = pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def _instance(study: str, sop: str, **attrs) -> Dataset:
  ds = copy.deepcopy(CT)
  ds.StudyInstanceUID = study
  ds.SeriesInstanceUID = fresh_uid(study, "series")
  ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
  for k, v in attrs.items():
    setattr(ds, k, v)
  return ds


def _save(ds: Dataset, path: Path, **kw) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(path, enforce_file_format=kw.pop("enforce", True), **kw)
  return path


def _bad_input_corpus(root: Path, outside: Path) -> dict:
  """Each hostile case under entity E1 or its own entity; returns expectations:
  'stored' and 'rejected' sets of file names (paths relative to root)."""
  study = fresh_uid("hostile", "study")
  sop = lambda n: fresh_uid("hostile", n)  # noqa: E731
  e = root / "E1"
  stored, rejected = set(), set()

  def keep(p):
    stored.add(str(p.relative_to(root)))

  def reject(p):
    rejected.add(str(p.relative_to(root)))

  keep(_save(_instance(study, sop("good")), e / "good.dcm"))
  (e / "zero.dcm").write_bytes(b"")
  reject(e / "zero.dcm")
  trunc = e / "truncated_header.dcm"
  trunc.write_bytes((e / "good.dcm").read_bytes()[:700])
  reject(trunc)
  # Pixel data cut short: the header is whole, the bytes are stored as given.
  keep(_save(_instance(study, sop("trunc_px")), e / "truncated_pixels.dcm"))
  data = (e / "truncated_pixels.dcm").read_bytes()
  (e / "truncated_pixels.dcm").write_bytes(data[:-5000])
  (e / "notes.txt").write_text("not an image\n")
  reject(e / "notes.txt")
  buf = io.BytesIO()
  Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
  (e / "photo.png").write_bytes(buf.getvalue())
  reject(e / "photo.png")
  # A dataset without the 128-byte preamble and 'DICM': read, and stored.
  no_preamble = _instance(study, sop("nopre"))
  no_preamble.preamble = None
  keep(_save(no_preamble, e / "no_preamble.dcm", enforce=False))
  for missing in ("StudyInstanceUID", "SOPInstanceUID"):
    ds = _instance(study, sop("missing" + missing))
    delattr(ds, missing)
    reject(_save(ds, e / f"no_{missing}.dcm"))
  # The same SOP instance twice in one study: the smaller path is kept.
  keep(_save(_instance(study, sop("dup"), InstanceNumber=1), e / "dup_a.dcm"))
  reject(_save(_instance(study, sop("dup"), InstanceNumber=2), e / "dup_b.dcm"))
  # Values that do not fit their columns stay in metadata as written.
  keep(_save(_instance(study, sop("baddate"), StudyDate="20070931",
                       SliceThickness="NaN", PixelSpacing=["Inf", "1.0"]),
             e / "bad_values.dcm"))
  keep(_save(_instance(study, sop("long"), StudyDescription="x" * 60000),
             e / "long_string.dcm"))
  latin = _instance(study, sop("latin1"), SpecificCharacterSet="ISO_IR 100")
  latin.PatientName = "Müller^Jürgen"
  keep(_save(latin, e / "latin1.dcm"))
  deep = Dataset()
  deep.CodeValue = "DEEPCODE"
  for _ in range(40):
    outer = Dataset()
    outer.ContentSequence = Sequence([deep])
    deep = outer
  keep(_save(_instance(study, sop("deep"), ContentSequence=deep.ContentSequence),
             e / "deep_sequence.dcm"))
  private = _instance(study, sop("private"))
  private.add_new(0x00291010, "OB", os.urandom(5000))
  private.add_new(0x00291011, "OB", b"\x00\x01\xfe\xff")
  keep(_save(private, e / "private_binary.dcm"))
  frames = _instance(study, sop("multiframe"), NumberOfFrames=4)
  frames.PixelData = CT.PixelData * 4
  keep(_save(frames, e / "multiframe.dcm"))
  rle = pydicom.dcmread(get_testdata_file("SC_rgb_rle_32bit_2frame.dcm"))
  rle.StudyInstanceUID = study
  keep(_save(rle, e / "multiframe_rle.dcm"))
  # An entity folder whose name cannot be part of an object key.
  reject(_save(_instance(fresh_uid("ctrl"), sop("ctrl")),
               root / "bad\x01entity" / "x.dcm"))
  # A link to a file outside the input root is not followed.
  target = _save(_instance(fresh_uid("outside"), sop("outside")),
                 outside / "secret.dcm")
  os.symlink(target, e / "link_out.dcm")
  reject(e / "link_out.dcm")
  os.symlink(e / "good.dcm", e / "link_in.dcm")   # stays inside: a copy
  return {"stored": stored, "rejected": rejected}


def test_bad_input_corpus(tmp_path):
  root = tmp_path / "input"
  expected = _bad_input_corpus(root, tmp_path / "outside")
  report = run_pipeline(root, tmp_path / "out")
  rows = read_rows(tmp_path / "out" / "metadata")
  rel = lambda p: str(Path(p).relative_to(root))  # noqa: E731
  got_stored = {rel(s["path"]) for s in read_stored_listing(report)}
  got_rejected = {rel(e["path"]): e["reason"] for e in report["rejected"]}
  assert expected["stored"] <= got_stored
  assert expected["rejected"] <= set(got_rejected)
  assert got_stored | set(got_rejected) == {
      rel(p) for p in root.rglob("*") if p.is_file() or p.is_symlink()}
  assert all(reason.strip() for reason in got_rejected.values())
  assert "outside the input root" in got_rejected["E1/link_out.dcm"]
  assert "duplicate SOPInstanceUID" in got_rejected["E1/dup_b.dcm"]
  assert "control characters" in got_rejected["bad\x01entity/x.dcm"]
  secret = (tmp_path / "outside" / "secret.dcm").read_bytes()
  objects = check_run(root, tmp_path / "out" / "bucket", rows, report)
  assert all(sha256(secret) != sha256(d) for d in objects.values())

  by_path = {r["source_path"]: r for r in rows}
  for row in rows:
    assert row_errors(row) == []
  bad = by_path["bad_values.dcm"]
  assert bad["StudyDate"] is None and bad["SliceThickness"] is None
  assert bad["metadata"]["StudyDate"] == "20070931"
  assert bad["metadata"]["SliceThickness"] == "NaN"
  assert bad["metadata"]["PixelSpacing"] == "Inf\\1.0"
  assert bad["invalid_values"] == ["$.SliceThickness", "$.PixelSpacing"]
  assert bad["PixelSpacing"] == []
  assert by_path["latin1.dcm"]["metadata"]["PatientName"] == "Müller^Jürgen"
  node = by_path["deep_sequence.dcm"]["metadata"]
  for _ in range(40):
    node = node["ContentSequence"][0]
  assert node == {"CodeValue": "DEEPCODE"}
  assert by_path["multiframe.dcm"]["NumberOfFrames"] == 4
  private = by_path["private_binary.dcm"]["metadata"]
  assert "00291010" not in private and private["00291011"] == "AAH+/w=="


# ---- Property: flagged images never leave ---------------------------------

# copy_in_phi: a plain image with a copy of it under PHI/: both are flagged.
PLACEMENTS = ("plain", "phi_folder", "burned", "deid", "copy_in_phi")
image_specs = st.lists(
    st.tuples(st.integers(0, 2),                  # entity
              st.integers(0, 1),                  # study
              st.sampled_from(PLACEMENTS),
              st.integers(0, 3),                  # folder depth
              st.integers(0, 3)),                 # where PHI/ sits in it
    min_size=1, max_size=14)


def _tree_from_specs(root: Path, specs) -> dict:
  """Writes the images; returns {'flagged': [...], 'kept': [...]} paths."""
  flagged, kept = [], []
  for n, (entity, study, placement, depth, phi_at) in enumerate(specs):
    folders = [f"d{i}" for i in range(depth)]
    attrs = {"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}
    if placement == "phi_folder":
      folders.insert(min(phi_at, depth), "PHI")
    elif placement == "burned":
      attrs["BurnedInAnnotation"] = "YES"
    elif placement == "deid":
      attrs["ImageType"] = []   # deid's recipe: ImageType empty -> blacklist
    ds = _instance(fresh_uid("prop", entity, study),
                   fresh_uid("prop", n, placement), **attrs)
    path = _save(ds, root.joinpath(f"P{entity}", *folders, f"i{n}.dcm"))
    (kept if placement == "plain" else flagged).append(path)
    if placement == "copy_in_phi":
      flagged.append(_save(ds, root.joinpath(f"P{entity}", "PHI", f"c{n}.dcm")))
  return {"flagged": flagged, "kept": kept}


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(specs=image_specs)
def test_flagged_images_never_leave(tmp_path_factory, specs):
  base = tmp_path_factory.mktemp("prop")
  root = base / "input"
  tree = _tree_from_specs(root, specs)
  report = run_pipeline(root, base / "out", "--phi_rules=folder,header,deid")
  rows = read_rows(base / "out" / "metadata")
  objects = check_run(root, base / "out" / "bucket", rows, report)
  archived = {sha256(m) for p in objects for m in
              __import__("invariants").archive_members(p).values()}
  for path in tree["flagged"]:
    data = path.read_bytes()
    assert sha256(data) not in archived
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.SOPInstanceUID not in {r["sop_instance_uid"] for r in rows}
  stored = [s["path"] for s in read_stored_listing(report)]
  assert sorted(stored) == sorted(str(p) for p in tree["kept"])
  assert len(rows) == len(tree["kept"])
