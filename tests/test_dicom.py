import json

import pydicom
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam import Create, Map
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from transforms.dicom import ReadHeaders, header_to_json, read_image_record
from transforms.records import REJECTED, SourceFile


def _source(path):
  import os
  return SourceFile(str(path), "E1", os.path.basename(str(path)),
                    os.path.getsize(path))


def test_header_json_keeps_nested_sequences_and_drops_bulk():
  ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
  inner = Dataset()
  inner.CodeValue = "deep"
  level = inner
  for _ in range(6):
    outer = Dataset()
    outer.ContentSequence = Sequence([level])
    level = outer
  ds.ContentSequence = level.ContentSequence
  ds.add_new(0x00091001, "OB", b"\x01" * 4096)   # private bulk: left out
  ds.add_new(0x00091002, "OB", b"\x00\xff")       # small binary: inline
  header = header_to_json(ds)
  node = header
  for _ in range(6):
    node = node["0040A730"]["Value"][0]
  assert node["00080100"]["Value"] == ["deep"]
  assert "7FE00010" not in header and "00091001" not in header
  assert header["00091002"]["InlineBinary"]
  json.dumps(header, allow_nan=False)


def test_invalid_values_are_kept_as_raw_text():
  ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
  ds.SliceThickness = "NaN"
  header = header_to_json(ds)
  assert header["00180050"]["Value"] == ["NaN"]
  assert header["00180050"]["InvalidValue"] is True
  json.dumps(header, allow_nan=False)


def test_read_image_record_reads_uids_and_transfer_syntax():
  path = get_testdata_file("MR_small.dcm")
  with open(path, "rb") as f:
    record = read_image_record(_source(path), f)
  ds = pydicom.dcmread(path)
  assert record.sop_instance_uid == ds.SOPInstanceUID
  assert record.study_instance_uid == ds.StudyInstanceUID
  assert record.transfer_syntax_uid == "1.2.840.10008.1.2.1"


def test_read_headers_routes_bad_files(tmp_path):
  good = get_testdata_file("CT_small.dcm")
  (tmp_path / "note.txt").write_text("hello")
  (tmp_path / "empty.dcm").write_bytes(b"")
  ds = pydicom.dcmread(good)
  del ds.SOPInstanceUID
  ds.save_as(tmp_path / "nosop.dcm")
  sources = [_source(good)] + [_source(tmp_path / n) for n in
                               ("note.txt", "empty.dcm", "nosop.dcm")]
  with TestPipeline() as p:
    out = p | Create(sources) | ReadHeaders()
    assert_that(out.images | Map(lambda r: r.source.relpath),
                equal_to(["CT_small.dcm"]), label="images")
    assert_that(out.excluded | Map(lambda e: (e.path.rsplit("/", 1)[1],
                                              e.status, e.reason.split(":")[0])),
                equal_to([("note.txt", REJECTED, "not a DICOM file"),
                          ("empty.dcm", REJECTED, "empty file (0 bytes)"),
                          ("nosop.dcm", REJECTED, "header lacks SOPInstanceUID")]),
                label="excluded")
