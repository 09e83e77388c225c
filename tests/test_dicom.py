
import json

import pydicom
from apache_beam.testing.util import assert_that, equal_to
from apache_beam import Create, Map
from pydicom.data import get_testdata_file

from conftest import local_pipeline
from transforms.dicom import ReadHeaders, read_image_record
from transforms.records import REJECTED, SourceFile, pack_text, unpack_text


def _source(path):
  import os
  return SourceFile(str(path), "E1", os.path.basename(str(path)),
                    os.path.getsize(path))


def test_read_image_record_reads_uids_and_transfer_syntax():
  path = get_testdata_file("MR_small.dcm")
  with open(path, "rb") as f:
    record = read_image_record(_source(path), f)
  ds = pydicom.dcmread(path)
  assert record.sop_instance_uid == ds.SOPInstanceUID
  assert record.study_instance_uid == ds.StudyInstanceUID
  assert record.transfer_syntax_uid == "1.2.840.10008.1.2.1"


def test_a_header_is_deflated_only_where_it_is_shuffled():
  """Dataflow carries the header's text deflated; a local run sets it aside
  plain. Either reads back as the same text."""
  path = get_testdata_file("CT_small.dcm")
  records = []
  for deflate_header in (True, False):
    with open(path, "rb") as f:
      records.append(read_image_record(_source(path), f,
                                       deflate_header=deflate_header))
  deflated, plain = (r.header for r in records)
  assert plain.header_packed == plain.metadata_text.encode("utf-8")
  assert len(deflated.header_packed) < len(plain.header_packed)
  assert deflated.metadata_text == plain.metadata_text
  assert json.loads(plain.metadata_text)["StudyInstanceUID"] == (
      records[0].study_instance_uid)
  for deflated in (True, False):
    text = '{"PatientName":"M\u00fcller^J\u00fcrgen"}'
    assert unpack_text(pack_text(text, deflated)) == text


def test_read_headers_routes_bad_files(tmp_path):
  good = get_testdata_file("CT_small.dcm")
  (tmp_path / "note.txt").write_text("hello")
  (tmp_path / "empty.dcm").write_bytes(b"")
  ds = pydicom.dcmread(good)
  del ds.SOPInstanceUID
  ds.save_as(tmp_path / "nosop.dcm")
  sources = [_source(good)] + [_source(tmp_path / n) for n in
                               ("note.txt", "empty.dcm", "nosop.dcm")]
  with local_pipeline() as p:
    out = p | Create(sources) | ReadHeaders()
    assert_that(out.images | Map(lambda r: r.source.relpath),
                equal_to(["CT_small.dcm"]), label="images")
    assert_that(out.excluded | Map(lambda e: (e.path.rsplit("/", 1)[1],
                                              e.status, e.reason.split(":")[0])),
                equal_to([("note.txt", REJECTED, "not a DICOM file"),
                          ("empty.dcm", REJECTED, "empty file (0 bytes)"),
                          ("nosop.dcm", REJECTED, "header lacks SOPInstanceUID")]),
                label="excluded")
