"""The header export by keyword (transforms/header_json.py): its rules,
checked against pydicom's own element values on every file pydicom ships;
and its fast path, equal to the export of every element through pydicom on
those files and on generated values chosen to hit the stripping, splitting
and fallback rules."""
import base64
import io
import json
import math
import struct

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

import transforms.header_json as header_json_module
from transforms.header_json import (element_key, export_by_pydicom,
                                    export_header)

pytestmark = pytest.mark.usefixtures("ignore_invalid_values")


def _both(read):
  """(fast export, the export through pydicom) of fresh reads of the same
  file: pydicom converts elements in place, so each gets its own. The fast
  export's text, built element by element and partly from its cache, must
  parse to its header, on a first and a second reading."""
  for _ in range(2):
    fast = export_header(read())
    assert json.loads(fast.text) == fast.header
  return fast, export_by_pydicom(read())


def _readable_testdata():
  for path in get_testdata_files():
    try:
      pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # pylint: disable=broad-except
      continue   # deliberately broken files pydicom itself cannot read
    yield path


def test_fast_path_equals_pydicom_on_every_file_pydicom_ships():
  compared = 0
  for path in _readable_testdata():
    fast, reference = _both(lambda: pydicom.dcmread(
        path, stop_before_pixels=True, force=True))
    assert fast == reference, path
    compared += 1
  assert compared > 150


def _expected(elem):
  """What the rules say an element becomes, from pydicom's value; None for
  a value the export keeps as written (invalid) or leaves out (bulk)."""
  vr = str(elem.VR)
  if vr == "SQ":
    return "sequence"
  if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN", "OB or OW"):
    return "binary"
  value = elem.value
  if elem.VM == 0:
    return (None,)
  values = list(value) if elem.VM > 1 else [value]
  if any(isinstance(v, bytes) for v in values):
    return None
  if vr in ("US", "SS", "UL", "SL", "UV", "SV", "IS"):
    out = [int(v) for v in values]
  elif vr in ("FL", "FD", "DS"):
    out = [float(v) for v in values]
    if not all(map(math.isfinite, out)):
      return None
  elif vr == "AT":
    out = [f"{int(v):08X}" for v in values]
  else:   # PN's string form, and the text of every other VR
    out = [str(v) for v in values]
  return (out[0] if len(out) == 1 else out,)


def test_every_element_follows_the_rules_against_pydicom_values():
  """Element by element: numbers as pydicom reads them, PN as its string,
  multi-valued as arrays, empty as null, sequences item by item, binary
  inline or left out, keys by keyword or tag."""
  checked = {"number": 0, "PN": 0, "multi": 0, "empty": 0, "sequence": 0,
             "private": 0, "binary": 0, "invalid": 0}

  def check(ds, exported, at):
    for elem in ds:
      if elem.tag == 0x7FE00010:
        continue
      key = element_key(elem.tag)
      path = f"{at}.{key}" if key[0].isalpha() else f'{at}."{key}"'
      if elem.tag.is_private:
        assert key == f"{int(elem.tag):08X}"
        checked["private"] += 1
      else:
        assert key in (keyword_for_tag(elem.tag), f"{int(elem.tag):08X}")
      try:
        expected = _expected(elem)
      except (ValueError, TypeError, OverflowError):
        expected = None
      if path in exported.invalid:
        assert isinstance(exported.header[key], str)
        checked["invalid"] += 1
        continue
      if expected == "sequence":
        items = exported.header[key]
        assert items is None if not len(elem.value) else (
            len(items) == len(elem.value))
        for i, item in enumerate(elem.value):
          check(item, header_json_module.HeaderExport(
              items[i], "", exported.invalid), f"{path}[{i}]")
        checked["sequence"] += 1
      elif expected == "binary":
        if elem.value is not None and len(elem.value) > 768:
          assert key not in exported.header
        elif elem.value:
          assert base64.b64decode(exported.header[key]) == bytes(elem.value)
        checked["binary"] += 1
      else:
        assert expected is not None, (path, elem)
        assert exported.header[key] == expected[0], path
        if expected[0] is None:
          checked["empty"] += 1
        elif isinstance(expected[0], list):
          checked["multi"] += 1
        elif isinstance(expected[0], (int, float)):
          checked["number"] += 1
        if elem.VR == "PN" and elem.VM:
          checked["PN"] += 1

  for path in _readable_testdata():
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    exported = export_header(pydicom.dcmread(path, stop_before_pixels=True,
                                             force=True))
    check(ds, exported, "$")
  assert all(n > 0 for n in checked.values()), checked


def test_the_rules_on_known_values():
  ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"),
                       stop_before_pixels=True)
  ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
  ds.PatientName = "Doe^Jane^^Dr"
  ds.InstitutionName = ""
  ds.add_new(0x00091001, "LO", "private value")
  ds.add_new(0x00090010, "LO", "ACME 1.0")              # private creator
  ds.add_new(0x00091002, "OB", b"\x00\xff")             # small binary: inline
  ds.add_new(0x00091003, "OB", b"\x01" * 4096)          # bulk: left out
  ds.add_new(0x60000010, "US", 512)                     # overlay group 6000
  ds.add_new(0x60020010, "US", 256)                     # overlay group 6002
  ds.add_new(0x00209165, "AT", [0x00100010, 0x00080060])
  code = Dataset()
  code.CodeValue = "24627-0"
  inner = Dataset()
  inner.CodeMeaning = "left"
  code.ProcedureCodeSequence = Sequence([inner])
  second = Dataset()
  second.CodeValue = "X-1"
  ds.RequestedProcedureCodeSequence = Sequence([code, second])
  ds.ReferencedImageSequence = Sequence([])
  header = export_header(ds).header
  assert header["ImageType"] == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
  assert header["Rows"] == 128 and isinstance(header["Rows"], int)
  assert header["PixelSpacing"] == [0.661468, 0.661468]
  assert header["PatientName"] == "Doe^Jane^^Dr"
  assert header["InstitutionName"] is None
  assert header["StudyDate"] == "20040119"
  assert header["00091001"] == "private value"
  assert header["00090010"] == "ACME 1.0"
  assert header["00091002"] == "AP8="
  assert "00091003" not in header and "PixelData" not in header
  assert header["OverlayRows"] == 512 and header["60020010"] == 256
  assert header["DimensionIndexPointer"] == ["00100010", "00080060"]
  procedures = header["RequestedProcedureCodeSequence"]
  assert [p["CodeValue"] for p in procedures] == ["24627-0", "X-1"]
  assert procedures[0]["ProcedureCodeSequence"] == [{"CodeMeaning": "left"}]
  assert header["ReferencedImageSequence"] is None


def test_invalid_values_are_kept_as_written_and_listed():
  ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
  ds.SliceThickness = "NaN"
  item = Dataset()
  # An InstanceNumber that is no number, as read from a file.
  item._dict[BaseTag(0x00200013)] = RawDataElement(  # pylint: disable=protected-access
      BaseTag(0x00200013), "IS", 4, b"12a ", 0, False, True, True, False)
  ds.ReferencedImageSequence = Sequence([item])
  exported = export_header(ds)
  assert exported.header["SliceThickness"] == "NaN"
  assert exported.header["ReferencedImageSequence"][0]["InstanceNumber"] == (
      "12a")
  assert exported.invalid == ("$.ReferencedImageSequence[0].InstanceNumber",
                              "$.SliceThickness")   # in tag order
  json.loads(exported.text)


def test_a_plain_header_is_converted_without_pydicom_elements(monkeypatch):
  through_pydicom = []
  original = header_json_module._by_pydicom
  monkeypatch.setattr(header_json_module, "_by_pydicom",
                      lambda ds, tag, fast, path: through_pydicom.append(
                          tag) or original(ds, tag, fast, path))
  ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"),
                       stop_before_pixels=True)
  header = export_header(ds).header
  assert len(header) > 90
  # Only two go through pydicom: the character set (converted while
  # reading) and a defined-length sequence (whose items are then exported
  # here).
  assert sorted(through_pydicom) == [0x00080005, 0x00101002]


def test_keeps_deeply_nested_sequences():
  ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
  inner = Dataset()
  inner.CodeValue = "deep"
  level = inner
  for _ in range(6):
    outer = Dataset()
    outer.ContentSequence = Sequence([level])
    level = outer
  ds.ContentSequence = level.ContentSequence
  node = export_header(ds).header
  for _ in range(6):
    node = node["ContentSequence"][0]
  assert node["CodeValue"] == "deep"


# --- generated elements, written as raw bytes ------------------------------

_LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN",
                    "UR", "UT"}


def _encode(elements, implicit: bool) -> bytes:
  """A Part 10 file: (tag, vr, value bytes) elements in tag order."""
  meta = Dataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
  meta.MediaStorageSOPInstanceUID = "1.2.3.4"
  meta.TransferSyntaxUID = ("1.2.840.10008.1.2" if implicit
                            else "1.2.840.10008.1.2.1")
  out = io.BytesIO()
  pydicom.dcmwrite(out, pydicom.FileDataset("", Dataset(), file_meta=meta,
                                            preamble=b"\0" * 128),
                   enforce_file_format=True)
  for tag, vr, value in sorted(elements):
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
      out.write(head + struct.pack("<I", len(value)) + value)
    elif vr in _LONG_LENGTH_VRS:
      out.write(head + vr.encode() + b"\0\0" + struct.pack("<I", len(value))
                + value)
    else:
      out.write(head + vr.encode() + struct.pack("<H", len(value)) + value)
  return out.getvalue()


def _assert_same(elements, implicit=False):
  data = _encode(elements, implicit)
  fast, reference = _both(lambda: pydicom.dcmread(io.BytesIO(data),
                                                  stop_before_pixels=True))
  assert fast == reference


# Public tags with the VR the dictionary gives them, for implicit VR files.
_TEXT_TAGS = {"AE": 0x00080054, "AS": 0x00101010, "CS": 0x00080060,
              "DA": 0x00080020, "DS": 0x00180050, "DT": 0x0008002A,
              "IS": 0x00200013, "LO": 0x00081030, "LT": 0x00204000,
              "PN": 0x00100010, "SH": 0x00080050, "ST": 0x00081080,
              "TM": 0x00080030, "UC": 0x00080119, "UI": 0x00080016,
              "UR": 0x00080120, "UT": 0x0040A160}
_text_bytes = st.text(alphabet="AB1.05+-eE \\\x00=^\t\n", max_size=12).map(
    str.encode) | st.binary(max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(_TEXT_TAGS)), _text_bytes, st.booleans())
def test_text_values_equal_pydicom(vr, value, implicit):
  _assert_same([(_TEXT_TAGS[vr], vr, value)], implicit)


_NUMBER_TAGS = {"US": 0x00280010, "SS": 0x00189219, "UL": 0x00081161,
                "SL": 0x00186020, "FL": 0x00189087, "FD": 0x00189089,
                "AT": 0x00209165, "OB": 0x00091010, "OW": 0x00091011,
                "OF": 0x00091012}


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(_NUMBER_TAGS)),
       st.binary(max_size=24) | st.binary(min_size=760, max_size=780))
def test_binary_values_equal_pydicom(vr, value):
  # NaN floats, odd lengths, and binary values either side of the bulk size.
  _assert_same([(_NUMBER_TAGS[vr], vr, value)])


@pytest.mark.parametrize("elements", [
    # other character sets: decoded by pydicom
    [(0x00080005, "CS", b"ISO_IR 100"), (0x00100010, "PN", b"M\xfcller^J")],
    [(0x00080005, "CS", b"ISO 2022 IR 87"),
     (0x00100010, "PN", b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B")],
    # explicit UN, private tags, LUT descriptors, group length
    [(0x00100010, "UN", b"Doe^J "), (0x00291010, "LO", b"private ")],
    [(0x00281101, "US", b"\x00\x00\x00\x00\x10\x00")],
    [(0x00080000, "UL", b"\x10\x00\x00\x00")],
    # several person names, component groups
    [(0x00100010, "PN", b"A^B\\C^D"), (0x00101001, "PN", b"A^B=C^D=")],
    # a DS too large for a float: kept as written
    [(0x00180050, "DS", b"1e400 ")],
])
def test_special_cases_equal_pydicom(elements):
  _assert_same(elements)
  _assert_same(elements, implicit=True)


def test_the_conversion_cache_stays_bounded_and_exact(monkeypatch):
  monkeypatch.setattr(header_json_module, "_converted_cache", {})
  monkeypatch.setattr(header_json_module, "_CACHE_ENTRIES", 50)
  for name in ("CT_small.dcm", "MR_small.dcm", "CT_small.dcm"):
    fast, reference = _both(lambda: pydicom.dcmread(
        get_testdata_file(name), stop_before_pixels=True))
    assert fast == reference
    cache = header_json_module._converted_cache
    assert 0 < len(cache) <= 50
    assert all(key[2] is None or len(key[2]) <= 256 for key in cache)
