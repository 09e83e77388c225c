"""Export a DICOM header to the DICOM JSON model (PS3.18 F.2), exactly as
pydicom's Dataset.to_json_dict() writes it, nested sequences included at any
depth, without pixel data or other bulk binary values.

Letting pydicom build a DataElement for each of a header's ~150 elements was
60% of the pipeline's CPU. So the common elements (plain ASCII text, numbers,
short binary values, in a little-endian dataset) are converted here straight
from the raw bytes pydicom read, with pydicom's own stripping and splitting
rules. Everything else (other character sets, private or ambiguous VRs, odd
lengths, values JSON cannot carry) goes through pydicom element by element;
a value pydicom cannot convert is kept as raw text flagged "InvalidValue"
instead of losing the whole header. tests/test_header_json.py checks the
result equals pydicom_header_json() on every file pydicom ships.
"""
from __future__ import annotations

import base64
import json
import math
import re
import struct
from typing import Any, Dict, Optional, Tuple

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

Header = Dict[str, Dict[str, Any]]

PIXEL_DATA = 0x7FE00010
# Binary values whose base64 text would exceed this are bulk data and left
# out, as pydicom's to_json_dict(bulk_data_threshold=...) decides it.
BULK_DATA_THRESHOLD = 1024
_MAX_INLINE_BYTES = (BULK_DATA_THRESHOLD // 4) * 3
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW",
               "US or OW", "US or SS or OW"}


def header_and_text(ds: Dataset) -> Tuple[Header, str]:
  """The header in the DICOM JSON model, keyed by 'GGGGEEEE', and that
  serialized: the same text serialize() gives (sorted keys, so the same
  header is always the same text), built from each element's own text."""
  return _export(ds, fast=True)


def serialize(header: Header) -> str:
  return json.dumps(header, sort_keys=True, ensure_ascii=False,
                    allow_nan=False)


def header_json(ds: Dataset) -> Header:
  return _export(ds, fast=True)[0]


def _export(ds: Dataset, fast: bool) -> Tuple[Header, str]:
  """Element by element, nested sequences included; fast=False: every
  element through pydicom (the reference the fast path is tested against).
  Returns the header and its serialize() text."""
  out: Header = {}
  parts = []
  items = ds._dict  # pylint: disable=protected-access
  # In tag order, which is serialize()'s sorted key order; as plain ints,
  # since pydicom's tags compare in Python code.
  for tag, elem in sorted(zip(map(int, items), items.values())):
    if tag == PIXEL_DATA:
      continue
    converted = _NOT_FAST
    if fast and type(elem) is RawDataElement:  # pylint: disable=unidiomatic-typecheck
      converted, part, key = _from_raw_cached(tag, elem)
    if converted is _NOT_FAST:
      converted, part = _by_pydicom(ds, tag, fast)
      key = f"{tag:08X}"
    if converted is not None:
      out[key] = converted
      parts.append(part)
  return out, "{" + ", ".join(parts) + "}"


def _part(tag: int, converted: Any) -> str:
  """One element as serialize() writes it inside the header's braces."""
  return f'"{tag:08X}": ' + serialize(converted)


# --- the fast path: straight from the raw bytes -----------------------------

_NOT_FAST = object()   # this element goes through pydicom instead
_NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f",
                   "FD": "d", "SV": "q", "UV": "Q"}
_INLINE_BINARY = {"OB", "OD", "OF", "OL", "OV", "OW"}
# pydicom's rules for text VRs (pydicom.values): which are split on '\' and
# how padding is stripped.
_STRIP_THEN_SPLIT = {"AS", "CS", "DA", "DT", "TM"}
_SPLIT_THEN_RSTRIP = {"SH", "LO", "UC"}
_SINGLE_TEXT = {"ST", "LT", "UT"}
_IS = re.compile(r" *[+-]?[0-9]+ *\Z")
_DS = re.compile(r" *[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)? *\Z")
# pydicom adjusts the first value of these (hooks._LUT_DESCRIPTOR_TAGS).
_LUT_DESCRIPTORS = {0x00281101, 0x00281102, 0x00281103, 0x00283002}
_dictionary_vr_cache: Dict[int, Optional[str]] = {}


def _dictionary_vr(tag: int) -> Optional[str]:
  """VR of a public tag read with implicit VR; None: leave it to pydicom."""
  try:
    return _dictionary_vr_cache[tag]
  except KeyError:
    pass
  vr = None
  if not (tag >> 16) % 2 and tag & 0xFFFF:   # private or group length: no
    try:
      vr = dictionary_VR(tag)
    except KeyError:
      vr = None
    if vr is not None and " or " in vr:       # ambiguous: pydicom resolves it
      vr = None
  _dictionary_vr_cache[tag] = vr
  return vr


def _from_raw(raw: RawDataElement) -> Any:
  """The JSON element, None for bulk data, or _NOT_FAST."""
  value = raw.value
  if value is None or not raw.is_little_endian or raw.tag in _LUT_DESCRIPTORS:
    return _NOT_FAST
  vr = raw.VR if raw.VR is not None else _dictionary_vr(raw.tag)
  if vr is None or vr == "UN":
    return _NOT_FAST
  if not value:
    return {"vr": vr} if vr != "SQ" else _NOT_FAST
  fmt = _NUMBER_FORMATS.get(vr)
  if fmt is not None:
    size = struct.calcsize("<" + fmt)
    if len(value) % size:
      return _NOT_FAST
    numbers = list(struct.unpack(f"<{len(value) // size}{fmt}", value))
    if vr in ("FL", "FD") and not all(map(math.isfinite, numbers)):
      return _NOT_FAST
    return {"vr": vr, "Value": numbers}
  if vr in _INLINE_BINARY:
    if len(value) > _MAX_INLINE_BYTES:
      return None
    return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}
  if vr == "AT":
    if len(value) % 4:
      return _NOT_FAST
    pairs = struct.unpack(f"<{len(value) // 2}H", value)
    return {"vr": vr, "Value": [f"{pairs[i]:04X}{pairs[i + 1]:04X}"
                                for i in range(0, len(pairs), 2)]}
  # Text: only plain ASCII (no ISO 2022 escapes) reads the same in every
  # character set; anything else is decoded by pydicom.
  if not value.isascii() or b"\x1b" in value:
    return _NOT_FAST
  text = value.decode("ascii")
  if vr in _STRIP_THEN_SPLIT:
    values = text.rstrip(" \x00").split("\\")
  elif vr in _SPLIT_THEN_RSTRIP:
    values = [v.rstrip("\x00 ") for v in text.split("\\")]
  elif vr in _SINGLE_TEXT:
    values = [text.rstrip("\x00 ")]
  elif vr == "UI":   # pydicom's UID strips each value
    values = [v.strip() for v in text.rstrip(" \x00").split("\\")]
  elif vr == "AE":
    values = [v.strip() for v in text.split("\\")]
  elif vr == "UR":
    values = [text.rstrip()]
  elif vr == "IS":
    values = text.rstrip(" \x00").split("\\")
    if not all(_IS.match(v) for v in values):
      return _NOT_FAST
    return {"vr": vr, "Value": [int(v) for v in values]}
  elif vr == "DS":
    values = text.rstrip(" \x00").split("\\")
    if not all(_DS.match(v) for v in values):
      return _NOT_FAST
    return {"vr": vr, "Value": [float(v) for v in values]}
  elif vr == "PN":
    text = text.rstrip("\x00 ")
    if "=" in text or "\\" in text:   # component groups, several names
      return _NOT_FAST
    values = [{"Alphabetic": text}] if text else []
  else:
    return _NOT_FAST
  if values == [""] or not values:
    return {"vr": vr}
  return {"vr": vr, "Value": values}


# The same value of the same element repeats across the headers of a series
# (all but a few of a CT slice's ~150 elements), so each distinct short value
# is converted and serialized once per worker process. Keys hold the raw
# bytes: values over _CACHED_VALUE_BYTES are converted every time, and the
# cache is emptied when full. Each image adds a few values of its own (its
# UIDs, position, times) that never repeat, so the cache is kept small
# (under ~1 MB) rather than grow with the number of images read: 2,048
# entries parse as fast as 16,384 did (512: ~15% slower). The instance's
# own UIDs, certain not to repeat, are not cached at all: fewer entries
# emptied and refilled, less of a worker's heap churned per image.
_CACHED_VALUE_BYTES = 256
_CACHE_ENTRIES = 2048
_NEVER_REPEATED = frozenset({0x00020003, 0x00080018})
_converted_cache: Dict[tuple, Tuple[Any, Optional[str], str]] = {}


def _from_raw_cached(tag: int, raw: RawDataElement
                     ) -> Tuple[Any, Optional[str], str]:
  """(_from_raw(raw), its _part text or None, its header key), from the
  cache when seen."""
  value = raw.value
  cacheable = ((value is None or len(value) <= _CACHED_VALUE_BYTES)
               and tag not in _NEVER_REPEATED)
  if cacheable:
    key = (tag, raw.VR, raw.is_little_endian, value)
    hit = _converted_cache.get(key)
    if hit is not None:
      return hit
  converted = _from_raw(raw)
  result = (converted, None if converted is _NOT_FAST or converted is None
            else _part(tag, converted), f"{tag:08X}")
  if cacheable:
    if len(_converted_cache) >= _CACHE_ENTRIES:
      _converted_cache.clear()
    _converted_cache[key] = result
  return result


# --- through pydicom ----------------------------------------------------------

def _by_pydicom(ds: Dataset, tag: int, fast: bool) -> Tuple[Any, Optional[str]]:
  """One element converted by pydicom (None for bulk data), and its _part
  text. A value pydicom cannot convert, or that JSON cannot carry (NaN), is
  kept as raw text."""
  try:
    elem = ds[tag]
  except Exception:  # pylint: disable=broad-except
    raw = ds.get_item(tag)
    return _with_part(tag, {"vr": "UN" if raw.VR is None else str(raw.VR),
                            "Value": [_raw_text(raw.value)],
                            "InvalidValue": True})
  vr = str(elem.VR)
  if vr in _BINARY_VRS and elem.value is not None and (
      len(elem.value) > _MAX_INLINE_BYTES):
    return None, None
  if vr == "SQ":
    items = [_export(item, fast) for item in elem.value]
    # serialize()'s text of {"vr": "SQ", "Value": [...]}, keys sorted
    return ({"vr": "SQ", "Value": [header for header, _ in items]},
            f'"{tag:08X}": {{"Value": [' + ", ".join(
                text for _, text in items) + '], "vr": "SQ"}')
  try:
    converted = elem.to_json_dict(bulk_data_element_handler=None,
                                  bulk_data_threshold=BULK_DATA_THRESHOLD)
    return _with_part(tag, converted)
  except Exception:  # pylint: disable=broad-except
    raw = ds.get_item(tag)
    text = _raw_text(getattr(raw, "value", None) or elem.value)
    return _with_part(tag, {"vr": vr, "Value": [text], "InvalidValue": True})


def _with_part(tag: int, converted: Dict[str, Any]) -> Tuple[Any, str]:
  return converted, _part(tag, converted)   # raises if JSON cannot carry it


def _raw_text(raw_value: Any) -> str:
  if isinstance(raw_value, bytes):
    # latin-1 maps every byte, so nothing is lost however the text was encoded.
    return raw_value.decode("latin-1").strip("\x00 ")
  return str(raw_value)


_BULK = "bulk data left out"


def pydicom_header_json(ds: Dataset) -> Header:
  """The reference the fast path is tested against: pydicom's own
  Dataset.to_json_dict(), bulk data left out; element by element through
  pydicom when that fails. Converts every element of `ds` in place."""
  try:
    header = ds.to_json_dict(bulk_data_threshold=BULK_DATA_THRESHOLD,
                             bulk_data_element_handler=lambda _elem: _BULK)
    _drop_bulk(header)
    serialize(header)
    return header
  except Exception:  # pylint: disable=broad-except
    return _export(ds, fast=False)[0]


def _drop_bulk(header: Header) -> None:
  for key in [k for k, v in header.items()
              if k == "7FE00010" or v.get("BulkDataURI") == _BULK]:
    del header[key]
  for value in header.values():
    if value.get("vr") == "SQ":
      for item in value.get("Value", ()):
        _drop_bulk(item)
