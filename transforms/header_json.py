"""Export a DICOM header as JSON keyed by DICOM keyword, nested sequences
included at any depth, without pixel data or other bulk binary values: what
a row's `metadata` holds, so that researchers write
JSON_VALUE(metadata, '$.RequestedProcedureCodeSequence[0].CodeValue').

The rules (README "Rows"):
- an element is keyed by its keyword; one without a keyword (private tags,
  private creators, unknown public tags, a repeating group other than its
  first, group lengths) by its tag as 8 upper-case hex digits ('00091001');
- value multiplicity 1 gives a scalar, more than 1 an array, an empty
  element null;
- US, SS, UL, SL, FL, FD, UV, SV, and IS/DS that parse, are JSON numbers;
- PN is its string form ('Family^Given', component groups joined by '=');
  AT is 'GGGGEEEE'; DA, TM, DT, UI and the other text VRs are the text as
  pydicom reads it (padding stripped);
- SQ is an array of objects that follow the same rules (null when empty);
- binary values whose base64 text would exceed 1 KiB, and pixel data, are
  left out; shorter ones are base64 text;
- a value that cannot be read as its VR says (an IS or DS that does not
  parse, a non-finite number, undecodable text) is kept as the text written,
  and its JSONPath is listed in the export's `invalid` (the row's
  `invalid_values`).

The reference is pydicom's own element values (export_by_pydicom: every
element through pydicom, then the rules above). Letting pydicom build a
DataElement for each of a header's ~150 elements was 60% of the pipeline's
CPU, so the common elements (plain ASCII text, numbers, short binary values,
in a little-endian dataset) are converted here straight from the raw bytes
pydicom read, with pydicom's own stripping and splitting rules; everything
else goes through pydicom element by element. tests/test_header_json.py
checks that both give the same export on every file pydicom ships.
"""

import base64
import collections.abc
import json
import math
import re
import struct
from typing import (Any, Callable, Dict, Hashable, Iterable, List,
                    NamedTuple, Optional, Set, Tuple)

from pydicom.datadict import (DicomDictionary, dictionary_VR, keyword_for_tag,
                              mask_match)
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

Header = Dict[str, Any]

PIXEL_DATA = 0x7FE00010
# Binary values whose base64 text would exceed this are bulk data and left
# out.
BULK_DATA_THRESHOLD = 1024
_MAX_INLINE_BYTES = (BULK_DATA_THRESHOLD // 4) * 3
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW",
               "US or OW", "US or SS or OW"}


class HeaderExport(NamedTuple):
  """A header by keyword, its JSON text, and the JSONPaths of the values
  kept as written because they could not be read as their VR says."""
  header: Header
  text: str
  invalid: Tuple[str, ...]


def serialize(value: Any) -> str:
  """How every value is written: compact, non-ASCII kept as is."""
  return json.dumps(value, ensure_ascii=False, allow_nan=False,
                    separators=(",", ":"))


def export_header(ds: Dataset) -> HeaderExport:
  """The header by keyword and its text (keys in tag order, so the same
  header is always the same text), built from each element's own text."""
  return _export(ds, True, "$")


def export_by_pydicom(ds: Dataset) -> HeaderExport:
  """The reference export_header is tested against: every element's value
  as pydicom converts it, then the same rules. Converts `ds` in place."""
  return _export(ds, False, "$")


_keys: Dict[int, str] = {}


def element_key(tag: int) -> str:
  """The element's keyword, else its tag as 'GGGGEEEE'. An element of a
  repeating group (overlays 60xx, curves 50xx ...) has its keyword only in
  the group's first instance, so that no two elements share a key."""
  key = _keys.get(tag)
  if key is None:
    entry = DicomDictionary.get(tag)
    if entry is not None:
      key = entry[4]
    else:
      mask = mask_match(tag)
      key = keyword_for_tag(tag) if mask and int(
          mask.replace("x", "0"), 16) == tag else ""
    key = _keys[tag] = key or f"{tag:08X}"
  return key


def json_path(parent: str, key: str) -> str:
  """JSONPath of a key below parent: $.Keyword, or $."00091001" (a key
  starting with a digit is quoted in BigQuery's JSONPath)."""
  return f'{parent}.{key}' if key[0].isalpha() else f'{parent}."{key}"'


_OMIT = object()   # bulk data: the element is left out
_NOT_RAW = object()   # an element to convert by pydicom, not from raw bytes


def _export(ds: Dataset, fast: bool, at: str) -> HeaderExport:
  """Element by element, nested sequences included; fast=False: every
  element through pydicom."""
  items = ds._dict  # pylint: disable=protected-access
  # In tag order, as plain ints, since pydicom's tags compare in Python code.
  ordered = sorted(zip(map(int, items), items.values()))
  if not fast:
    return _export_converted(((tag, None, _NOT_RAW, 0, 0)
                              for tag, _ in ordered), lambda _: ds, False, at)
  return _export_converted(
      ((tag, elem.VR, elem.value, 0, 0) if type(elem) is RawDataElement  # pylint: disable=unidiomatic-typecheck
       and elem.is_little_endian else (tag, None, _NOT_RAW, 0, 0)
       for tag, elem in ordered), lambda _: ds, True, at)


# A raw element as transforms/part10.py walks it: (tag, VR or None when
# implicit, value as read, length, where its value starts).
RawElement = Tuple[int, Optional[str], Optional[bytes], int, int]


def export_elements(elements: Iterable[RawElement],
                    dataset: Callable[[Set[int]], Dataset],
                    context: Hashable) -> HeaderExport:
  """export_header of a little-endian dataset given as its raw elements, in
  ascending tag order.

  dataset(tags) is called, once, only if some elements need pydicom to
  convert them: it returns a dataset holding at least those tags and what
  pydicom consults to convert them (part10.Part10Header.dataset_for).
  context: the values of those other elements, and whether the VR is
  implicit; a sequence with explicit VR is converted once per distinct raw
  value and context.
  """
  return _export_converted(elements, dataset, True, "$", context)


# A sequence's raw value repeats across a series' headers as its other
# elements do (a patient's other IDs, a procedure code), and pydicom's
# conversion of one is ~60 us: up to this many distinct ones are kept, as
# (value, text, invalid paths), emptied when full.
_SEQUENCE_ENTRIES = 256
_CACHED_SEQUENCE_BYTES = 4096
_sequence_cache: Dict[tuple, Tuple[Any, str, Tuple[str, ...]]] = {}


def _export_converted(elements, dataset, fast: bool, at: str,
                      context: Hashable = None) -> HeaderExport:
  converted: List[Any] = []   # (key, value, text), or a tag for pydicom
  to_pydicom: List[int] = []
  sequence_keys: Dict[int, tuple] = {}
  cached = _converted_cache.get
  for tag, vr, value, _, _ in elements:
    if tag == PIXEL_DATA:
      continue
    if value is not _NOT_RAW:
      # _from_raw_cached, its lookup inlined: ~250 elements per CT slice
      key, converted_value, part = (cached((tag, vr, value))
                                    or _from_raw_cached(tag, vr, value))
      if converted_value is _OMIT:
        continue
      if part is not None:
        converted.append((key, converted_value, part))
        continue
      if (vr == "SQ" and context is not None and value is not None
          and len(value) <= _CACHED_SEQUENCE_BYTES):
        sequence_keys[len(converted)] = (tag, value, context)
    to_pydicom.append(len(converted))
    converted.append(tag)
  invalid: List[str] = []
  tags = [converted[i] for i in to_pydicom]
  ds = None
  for i in to_pydicom:   # in tag order, as pydicom would convert them
    tag = converted[i]
    key = element_key(tag)
    sequence_key = sequence_keys.get(i)
    by_pydicom = _sequence_cache.get(sequence_key) if sequence_key else None
    if by_pydicom is None:
      if ds is None:
        ds = dataset(set(tags))
      by_pydicom = _by_pydicom(ds, tag, fast, json_path(at, key))
      if sequence_key:
        if len(_sequence_cache) >= _SEQUENCE_ENTRIES:
          _sequence_cache.clear()
        _sequence_cache[sequence_key] = by_pydicom
    value, text, bad = by_pydicom
    converted[i] = None if value is _OMIT else (key, value, f'"{key}":{text}')
    invalid.extend(bad)
  out: Header = {}
  parts: List[str] = []
  for element in converted:
    if element is not None:
      out[element[0]] = element[1]
      parts.append(element[2])
  return HeaderExport(out, "{" + ",".join(parts) + "}", tuple(invalid))


def _one_or_many(values: List[Any]) -> Any:
  if not values:
    return None
  return values[0] if len(values) == 1 else values


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


def _from_raw(tag: int, vr: Optional[str], value: Optional[bytes]) -> Any:
  """A little-endian raw element's value by the rules, _OMIT for bulk data,
  or _NOT_FAST."""
  if value is None or tag in _LUT_DESCRIPTORS:
    return _NOT_FAST
  if vr is None:
    vr = _dictionary_vr(tag)
  if vr is None or vr == "UN" or vr == "SQ":
    return _NOT_FAST
  if not value:
    return None
  fmt = _NUMBER_FORMATS.get(vr)
  if fmt is not None:
    size = struct.calcsize("<" + fmt)
    if len(value) % size:
      return _NOT_FAST
    numbers = list(struct.unpack(f"<{len(value) // size}{fmt}", value))
    if vr in ("FL", "FD") and not all(map(math.isfinite, numbers)):
      return _NOT_FAST
    return _one_or_many(numbers)
  if vr in _INLINE_BINARY:
    if len(value) > _MAX_INLINE_BYTES:
      return _OMIT
    return base64.b64encode(value).decode("ascii")
  if vr == "AT":
    if len(value) % 4:
      return _NOT_FAST
    pairs = struct.unpack(f"<{len(value) // 2}H", value)
    return _one_or_many([f"{pairs[i]:04X}{pairs[i + 1]:04X}"
                         for i in range(0, len(pairs), 2)])
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
    return _one_or_many([int(v) for v in values])
  elif vr == "DS":
    values = text.rstrip(" \x00").split("\\")
    if not all(_DS.match(v) for v in values):
      return _NOT_FAST
    numbers = [float(v) for v in values]
    if not all(map(math.isfinite, numbers)):
      return _NOT_FAST
    return _one_or_many(numbers)
  elif vr == "PN":
    text = text.rstrip("\x00 ")
    if "=" in text or "\\" in text:   # component groups, several names
      return _NOT_FAST
    return text or None
  else:
    return _NOT_FAST
  if values == [""]:
    return None
  return _one_or_many(values)


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
_converted_cache: Dict[tuple, Tuple[str, Any, Optional[str]]] = {}


def _from_raw_cached(tag: int, vr: Optional[str], value: Optional[bytes]
                     ) -> Tuple[str, Any, Optional[str]]:
  """(key, _from_raw(...), its '"key":value' text or None when the
  element goes through pydicom or is left out), from the cache when seen."""
  cacheable = ((value is None or len(value) <= _CACHED_VALUE_BYTES)
               and tag not in _NEVER_REPEATED)
  if cacheable:
    cache_key = (tag, vr, value)
    hit = _converted_cache.get(cache_key)
    if hit is not None:
      return hit
  converted = _from_raw(tag, vr, value)
  key = element_key(tag)
  result = (key, converted,
            None if converted is _NOT_FAST or converted is _OMIT
            else f'"{key}":{serialize(converted)}')
  if cacheable:
    if len(_converted_cache) >= _CACHE_ENTRIES:
      _converted_cache.clear()
    _converted_cache[cache_key] = result
  return result


# --- through pydicom ----------------------------------------------------------

def _by_pydicom(ds: Dataset, tag: int, fast: bool, path: str
                ) -> Tuple[Any, str, Tuple[str, ...]]:
  """One element's value from pydicom's (_OMIT for bulk data), its text, and
  the JSONPaths of invalid values in it. A value pydicom cannot convert, or
  that JSON cannot carry (NaN), is kept as the text written."""
  written = ds.get_item(tag)   # before pydicom converts it in place
  try:
    elem = ds[tag]
    vr = str(elem.VR)
    if vr == "SQ":
      exported = [_export(item, fast, f"{path}[{i}]")
                  for i, item in enumerate(elem.value)]
      if not exported:
        return None, "null", ()
      return ([e.header for e in exported],
              "[" + ",".join(e.text for e in exported) + "]",
              tuple(p for e in exported for p in e.invalid))
    value = _pydicom_value(elem, vr)
    if value is _OMIT:
      return _OMIT, "", ()
    return value, serialize(value), ()
  except Exception:  # pylint: disable=broad-except
    text = _as_written(written)
    return text, serialize(text), (path,)


def _pydicom_value(elem, vr: str) -> Any:
  """A converted element's value by the rules; raises ValueError when it
  cannot be carried as its VR says."""
  if vr in _BINARY_VRS:
    if elem.value is None or not len(elem.value):
      return None
    if len(elem.value) > _MAX_INLINE_BYTES:
      return _OMIT
    return base64.b64encode(bytes(elem.value)).decode("ascii")
  if elem.VM == 0:
    return None
  values = list(elem.value) if elem.VM > 1 else [elem.value]
  return _one_or_many([_scalar(v, vr) for v in values])


def _scalar(v: Any, vr: str) -> Any:
  if isinstance(v, bytes):   # text pydicom could not decode
    raise ValueError("undecoded text")
  if vr == "PN":
    return str(v)
  if vr == "AT":
    return f"{int(v):08X}"
  if vr == "IS" or vr in ("US", "SS", "UL", "SL", "UV", "SV"):
    return int(v)
  if vr in ("DS", "FL", "FD"):
    number = float(v)
    if not math.isfinite(number):
      raise ValueError("not a finite number")
    return number
  return str(v)


def _as_written(element) -> str:
  """An element's value as the text it was written as."""
  value = getattr(element, "value", None)
  if isinstance(value, bytes):   # raw: as read from the file
    # latin-1 maps every byte, so nothing is lost however it was encoded.
    return value.decode("latin-1").strip("\x00 ")
  if value is None:
    return ""
  if isinstance(value, collections.abc.Sequence) and not isinstance(value, str):
    # several values (pydicom's MultiValue), as DICOM joins them
    return "\\".join(str(v) for v in value)
  return str(value)
