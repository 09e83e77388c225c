import json

from apache_beam import Create
from apache_beam.testing.util import assert_that, equal_to

from conftest import exported, local_pipeline
from transforms.dicom import image_record
from transforms.records import (MemberLocation, ObjectLocation,
                                SourceFile, StoredStudy, Study)
from transforms.rows import BuildRows, _date
from transforms.schema import TABLE_SCHEMA, row_errors, schema_json
from transforms.sinks import CheckRows


def _stored():
  header = {
      "StudyDate": "20070931",                                 # not a date
      "Modality": "CT",
      "ImageType": ["ORIGINAL", "PRIMARY"],
      "Rows": 512,
      "SliceThickness": "NaN",                                 # kept as written
      "PixelSpacing": [0.5, 0.5],
      "PatientName": "SUBJ^ONE",
      "StudyInstanceUID": "1.1", "SeriesInstanceUID": "1.1.1",
      "SOPInstanceUID": "1.1.1.1",
  }
  image = image_record(SourceFile("/in/E1/a.dcm", "E1", "a.dcm", 10),
                       exported(header, ["$.SliceThickness"]),
                       "1.2.840.10008.1.2.1")
  study = Study("E1", "1.1", "00000000", "A1",
                "Collection/C/Entity/E1/E1_00000000_A1.tar.gz", (image,))
  loc = ObjectLocation("/b/" + study.object_key, "/b", study.object_key, 99,
                       "md5==", "crc==", "2026-01-01T00:00:00.000000Z")
  return StoredStudy(study, loc, (MemberLocation(
      "1.1.1.1", "E1_00000000_A1/a.dcm", 10, "ab" * 32, 0, 50),))


def test_typed_columns_are_null_where_values_do_not_fit():
  cols = _stored().study.images[0].header.columns
  assert cols["StudyDate"] is None and cols["SliceThickness"] is None
  assert cols["Modality"] == "CT" and cols["Rows"] == 512
  assert cols["ImageType"] == ["ORIGINAL", "PRIMARY"]
  assert cols["PixelSpacing"] == [0.5, 0.5]
  assert cols["invalid_values"] == ["$.SliceThickness"]


def test_dates_are_read_only_as_dicom_dates():
  assert [_date(v) for v in ("20070930", " 19991231 ", "00010101")] == [
      "2007-09-30", "1999-12-31", "0001-01-01"]
  assert [_date(v) for v in ("20070931", "2007093", "2007-09-30",
                             "200709301", "", None, 20070930.5)] == [None] * 7


def test_built_rows_fit_the_schema():
  with local_pipeline() as p:
    rows = p | Create([_stored()]) | BuildRows("C", "run1", "0.1.0")
    checked = rows | CheckRows()
    assert_that(checked.dead_letter, equal_to([]), label="no dead letters")
    assert_that(checked.valid | __import__("apache_beam").Map(
        lambda r: (r["sop_instance_uid"], r["storage"]["member_length"],
                   json.loads(r["metadata"])["Modality"])),
        equal_to([("1.1.1.1", 50, "CT")]), label="rows")


def test_rows_that_do_not_fit_go_to_the_dead_letter_output():
  bad = {"collection": "C", "Rows": "many", "extra": 1}
  errors = row_errors(bad)
  assert "extra: not in the schema" in errors
  assert any(e.startswith("Rows:") for e in errors)
  assert any(e == "storage: required but missing" for e in errors)
  with local_pipeline() as p:
    checked = p | Create([bad]) | CheckRows()
    assert_that(checked.valid, equal_to([]), label="valid")
    assert_that(checked.dead_letter | __import__("apache_beam").Map(
        lambda d: (d["stage"], "Rows:" in d["error"])),
        equal_to([("schema check", True)]), label="dead")


def test_schema_json_is_the_table_schema():
  assert json.loads(schema_json()) == TABLE_SCHEMA["fields"]
  names = [f["name"] for f in TABLE_SCHEMA["fields"]]
  assert len(names) == len(set(names))


def test_rows_over_the_size_limit_are_refused_even_when_escaping_makes_them_so():
  from transforms.schema import MAX_ROW_BYTES, row_size_bytes
  row = build_row_for_size_test()
  assert row_errors(row) == []
  assert row_size_bytes(row) < 64 * 1024
  # Fewer characters than the limit, but JSON doubles every quote.
  row["metadata"] = '"' * (MAX_ROW_BYTES // 2 + 1)
  assert row_size_bytes(row) == len(json.dumps(row).encode("utf-8"))
  assert any("bytes (at most" in e for e in row_errors(row))
  row["metadata"] = "x" * (MAX_ROW_BYTES // 8)
  assert not any("bytes (at most" in e for e in row_errors(row))


def build_row_for_size_test():
  from transforms.rows import build_row
  stored = _stored()
  image = stored.study.images[0]
  return build_row("C", stored, image, image.header, stored.members[0],
                   "run1", "0.1.0")
