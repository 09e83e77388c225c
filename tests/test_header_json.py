"""The header export (transforms/header_json.py) equals pydicom's own
Dataset.to_json_dict() export, on every file pydicom ships and on generated
values chosen to hit the stripping, splitting and fallback rules."""
import io
import json
import struct

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import transforms.header_json as header_json_module
from transforms.header_json import (header_and_text, header_json,
                                    pydicom_header_json, serialize)

pytestmark = pytest.mark.usefixtures("ignore_invalid_values")


def _both(read):
  """(fast export's text, pydicom's export serialized) of fresh reads of the
  same file: pydicom converts elements in place, so each export gets its
  own. The fast export's text, built element by element and partly from
  its cache, must be exactly serialize() of its header, on a first and a
  second reading."""
  for _ in range(2):
    header, text = header_and_text(read())
    assert text == serialize(header)
  return text, serialize(pydicom_header_json(read()))


def test_equals_pydicom_on_every_file_pydicom_ships():
  compared = 0
  for path in get_testdata_files():
    try:
      pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # pylint: disable=broad-except
      continue   # deliberately broken files pydicom itself cannot read
    fast, reference = _both(lambda: pydicom.dcmread(
        path, stop_before_pixels=True, force=True))
    assert fast == reference, path
    compared += 1
  assert compared > 150


def test_a_plain_header_is_converted_without_pydicom_elements(monkeypatch):
  through_pydicom = []
  original = header_json_module._by_pydicom
  monkeypatch.setattr(header_json_module, "_by_pydicom",
                      lambda ds, tag, fast: through_pydicom.append(
                          tag) or original(ds, tag, fast))
  ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"),
                       stop_before_pixels=True)
  header = header_json(ds)
  assert len(header) > 90
  # Only two go through pydicom: the character set (converted while
  # reading) and a defined-length sequence (whose items are then exported
  # here).
  assert sorted(through_pydicom) == [0x00080005, 0x00101002]


def test_keeps_nested_sequences_and_drops_bulk():
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
  header = header_json(ds)
  node = header
  for _ in range(6):
    node = node["0040A730"]["Value"][0]
  assert node["00080100"]["Value"] == ["deep"]
  assert "7FE00010" not in header and "00091001" not in header
  assert header["00091002"]["InlineBinary"] == "AP8="
  json.dumps(header, allow_nan=False)


def test_invalid_values_are_kept_as_raw_text():
  ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
  ds.SliceThickness = "NaN"
  header = header_json(ds)
  assert header["00180050"]["Value"] == ["NaN"]
  assert header["00180050"]["InvalidValue"] is True
  json.dumps(header, allow_nan=False)


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
    assert all(key[3] is None or len(key[3]) <= 256 for key in cache)
