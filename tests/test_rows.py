import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _row_errors_by_reading_the_schema(row, fields=None, prefix=""):
  """row_errors as first written: each field's dict read for every row.
  The reference the faster check is held to."""
  from transforms.schema import _scalar_error, size_errors
  errors = []
  if fields is None:
    fields = TABLE_SCHEMA["fields"]
    errors += size_errors(row)
  known = {f["name"] for f in fields}
  errors += [f"{prefix}{k}: not in the schema" for k in row if k not in known]
  for f in fields:
    name, mode = prefix + f["name"], f.get("mode", "NULLABLE")
    value = row.get(f["name"])
    if value is None:
      if mode == "REQUIRED":
        errors.append(f"{name}: required but missing")
      continue
    values = value if mode == "REPEATED" else [value]
    if mode == "REPEATED" and not isinstance(value, list):
      errors.append(f"{name}: repeated field is not a list")
      continue
    for v in values:
      if f["type"] == "RECORD":
        if not isinstance(v, dict):
          errors.append(f"{name}: is not a record")
        else:
          errors += _row_errors_by_reading_the_schema(v, f["fields"],
                                                      name + ".")
      else:
        problem = _scalar_error(f["type"], v)
        if problem:
          errors.append(f"{name}: {v!r:.80} {problem}")
  return errors


class _Text(str):
  pass


_ANY_VALUE = st.one_of(
    st.none(), st.text(max_size=12), st.builds(_Text, st.text(max_size=5)),
    st.integers(), st.integers(min_value=1 << 63, max_value=1 << 70),
    st.booleans(), st.floats(), st.sampled_from(["2020-01-31", "2020-02-30",
                                                 "2020-01-01T00:00:00Z"]),
    st.lists(st.one_of(st.text(max_size=3), st.floats(), st.integers()),
             max_size=3),
    st.dictionaries(st.sampled_from(["bucket", "object_name", "extra"]),
                    st.one_of(st.text(max_size=3), st.integers()),
                    max_size=3))


@settings(max_examples=300, deadline=None)
@given(changes=st.dictionaries(
    st.sampled_from([f["name"] for f in TABLE_SCHEMA["fields"]] + ["nope"]),
    _ANY_VALUE, max_size=6),
       storage_changes=st.dictionaries(st.sampled_from(
           [f["name"] for f in next(f for f in TABLE_SCHEMA["fields"]
                                     if f["name"] == "storage")["fields"]]
           + ["nope"]), _ANY_VALUE, max_size=3))
def test_the_schema_check_finds_what_reading_the_schema_finds(
    changes, storage_changes):
  row = build_row_for_size_test()
  assert row_errors(row) == [] == _row_errors_by_reading_the_schema(row)
  row.update(changes)
  if isinstance(row.get("storage"), dict):
    row["storage"] = {**row["storage"], **storage_changes}
  try:
    expected = _row_errors_by_reading_the_schema(row)
  except OverflowError:   # a FLOAT of an int too large for a float
    with pytest.raises(OverflowError):
      row_errors(row)
    return
  assert row_errors(row) == expected
