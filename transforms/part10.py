"""Read a DICOM file's header from one block of its bytes, for the files
nearly every archive holds: Part 10 (128-byte preamble, 'DICM'), with a
little-endian transfer syntax, and a header that fits in the block.

The result holds the dataset pydicom.dcmread(f, stop_before_pixels=True)
returns for the same bytes: the same raw elements, which pydicom converts
when they are read, and the same character set. Its export by keyword
(Part10Header.export) equals export_header of that dataset, but is made
from the raw elements without making the dataset: only the elements that
need pydicom (sequences, non-ASCII text ...) are converted, in a dataset of
them and of the few elements pydicom consults to convert them. Sequences
of undefined length are read by pydicom's own read_sequence. Only the walk from one
top-level element to the next is done here, with struct on the block,
instead of by pydicom's general reader, which makes several file-object
calls and checks per element and was two thirds of the cost of reading a
header (~1 ms of ~1.5 ms for a CT slice's ~180 elements).

Anything else returns None, and the caller reads the file with pydicom:
no preamble, big endian, deflated or private syntaxes, no transfer syntax,
a command set, an unknown VR, data whose VR encoding differs from what its
transfer syntax says, an undefined length other than a sequence's, a header
larger than the block. tests/test_part10.py checks that both readers give
the same header for every file pydicom ships.
"""

import functools
import io
import struct
from typing import Any, Dict, List, Optional, Set

import pydicom.uid
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import (DataElement, RawDataElement,
                              convert_raw_data_element, empty_value_for_VR)
from pydicom.dataset import Dataset
from pydicom.filereader import read_sequence
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR
from pydicom.values import convert_string

from transforms.header_json import (HeaderExport, RawElement, export_elements,
                                    export_header)

# Where dcmread(stop_before_pixels=True) stops (pydicom's _at_pixel_data).
_PIXEL_DATA_TAGS = frozenset((0x7FE00010, 0x7FE00009, 0x7FE00008))
# Groups whose elements end the walk or need pydicom: the command set, file
# meta, pixel data, items and delimiters.
_GROUPS_TO_CHECK = frozenset((0x0000, 0x0002, 0x7FE0, 0xFFFE))
_CHARACTER_SET = 0x00080005
# What pydicom reads from a dataset to convert another of its elements: the
# character set, and what an ambiguous VR depends on (PixelRepresentation,
# BitsAllocated, LUTDescriptor, WaveformBitsAllocated; filewriter.py
# _correct_ambiguous_vr_element).
_CONTEXT_TAGS = frozenset((_CHARACTER_SET, 0x00280100, 0x00280103,
                           0x00283002, 0x54001004))
_TRANSFER_SYNTAX = 0x00020010
_UNDEFINED_LENGTH = 0xFFFFFFFF
_IMPLICIT_HEAD = struct.Struct("<HHL").unpack_from
_EXPLICIT_HEAD = struct.Struct("<HH2sH").unpack_from
_LENGTH_32 = struct.Struct("<L").unpack_from
# The VRs pydicom knows, as the text it gives them.
_VR_TEXT = {vr.encode(default_encoding): str(vr) for vr in VR}
_LONG_LENGTH = frozenset(vr.encode(default_encoding)
                         for vr in EXPLICIT_VR_LENGTH_32)
_new_tuple = tuple.__new__
_GENERAL_READER_ONLY = frozenset((pydicom.uid.ExplicitVRBigEndian,
                                  pydicom.uid.DeflatedExplicitVRLittleEndian))


class Part10Header:
  """A header read from a block: its elements as walked, the dataset
  pydicom would have made of them (built when first asked for), and its
  export by keyword."""

  def __init__(self, elements: List[RawElement], sequences: Dict[int, Any],
               ascending: bool, implicit: bool, encoding,
               transfer_syntax_uid: str, end: int):
    # In file order; a sequence of undefined length has no value here but
    # its DataElement, read by pydicom, in sequences.
    self.elements = elements
    self.sequences = sequences
    self.ascending = ascending
    self.implicit = implicit
    self.encoding = encoding
    self.transfer_syntax_uid = transfer_syntax_uid
    # where the header ends: the pixel data element, or the file's end
    self.end = end

  @functools.cached_property
  def dataset(self) -> Dataset:
    return self._dataset(self.elements)

  def dataset_for(self, tags: Set[int]) -> Dataset:
    """A dataset of the elements with these tags and those pydicom consults
    to convert them: the character set, what resolves an ambiguous VR, the
    private creators (the VR of a private element read with implicit VR)."""
    tags = tags | _CONTEXT_TAGS
    return self._dataset([
        element for element in self.elements if element[0] in tags
        or element[0] & 0x10000 and 0x10 <= element[0] & 0xFFFF <= 0xFF])

  def _dataset(self, elements: List[tuple]) -> Dataset:
    dataset = Dataset({
        BaseTag(tag): self.sequences[tag] if length == _UNDEFINED_LENGTH
        else _element(tag, vr, length, value, at, self.implicit)
        for tag, vr, value, length, at in elements})
    # As pydicom's read_dataset leaves a top-level dataset.
    dataset.set_original_encoding(self.implicit, True, self.encoding)
    return dataset

  def export(self) -> HeaderExport:
    """export_header(self.dataset), converting in a dataset only the
    elements that need pydicom: making a CT slice's ~250 elements into a
    Dataset, then reading them back from it, was ~40% of reading it."""
    if not self.ascending:   # pydicom sorts them, and keeps the last of a tag
      return export_header(self.dataset)
    # The character set is among these elements, so its encoding is too.
    context = (self.implicit, tuple(element[:3] for element in self.elements
                                    if element[0] in _CONTEXT_TAGS))
    return export_elements(self.elements, self.dataset_for, context)


def _element(tag, vr, length, value, value_tell, implicit):
  # RawDataElement(tag, vr, length, value, value_tell, implicit, True),
  # without the Python-level __new__ of a NamedTuple (~0.3 us of ~2).
  return _new_tuple(RawDataElement, (BaseTag(tag), vr, length, value,
                                     value_tell, implicit, True, True, False))


def read_part10_header(fileobj, block_bytes: int) -> Optional[Part10Header]:
  """The header of the file fileobj is at the start of, from one read of
  block_bytes; None when pydicom's general reader must read it. Leaves
  fileobj where the header ends, or at 0 when it returns None."""
  block = fileobj.read(block_bytes)
  # A short block is the whole file only if nothing follows it: a stream
  # that returns fewer bytes than asked before its end must not cut the
  # header short.
  whole_file = len(block) < block_bytes and not fileobj.read(1)
  try:
    header = part10_header(block, whole_file)
  except Exception:  # pylint: disable=broad-except
    header = None   # never this reader's call: pydicom reads it and says why
  fileobj.seek(0 if header is None else header.end)
  return header


def part10_header(block: bytes, whole_file: bool) -> Optional[Part10Header]:
  """The header in block (a file's first bytes; all of them if whole_file),
  or None."""
  if len(block) < 132 or block[128:132] != b"DICM":
    return None
  meta = _walk(block, 132, implicit=False, whole_file=whole_file, meta=True)
  if meta is None:
    return None
  meta_elements, _, _, start, _ = meta
  syntax = _transfer_syntax(meta_elements)
  if not isinstance(syntax, str) or not syntax or (
      syntax in _GENERAL_READER_ONLY
      or syntax in pydicom.uid.PrivateTransferSyntaxes):
    return None
  # dcmread's rule: any syntax other than these is explicit VR little endian.
  implicit = syntax == pydicom.uid.ImplicitVRLittleEndian
  if len(block) < start + 8 or _looks_implicit(block, start) != implicit:
    return None   # no dataset, or one pydicom would read the other way
  walked = _walk(block, start, implicit, whole_file, meta=False)
  if walked is None:
    return None
  elements, sequences, ascending, end, encoding = walked
  return Part10Header(elements, sequences, ascending, implicit, encoding,
                      str(syntax), end)


def _transfer_syntax(meta_elements: List[tuple]) -> Optional[object]:
  """The TransferSyntaxUID's value as pydicom converts it, or None."""
  for tag, vr, value, length, at in reversed(meta_elements):  # the last
    if tag == _TRANSFER_SYNTAX and length != _UNDEFINED_LENGTH:
      return _converted_syntax(vr, length, value, at)
  return None


@functools.lru_cache(maxsize=64)
def _converted_syntax(vr, length, value, value_tell):
  # pydicom's conversion, once per distinct value: every file has one.
  return convert_raw_data_element(
      _element(_TRANSFER_SYNTAX, vr, length, value, value_tell, False)).value


def _looks_implicit(block: bytes, pos: int) -> bool:
  """pydicom's test of a dataset's first element (filereader._is_implicit_vr):
  implicit VR unless the two bytes after the tag are capital letters."""
  first, second = block[pos + 4], block[pos + 5]
  return not (0x40 < first < 0x5B and 0x40 < second < 0x5B)


def _walk(block: bytes, pos: int, implicit: bool, whole_file: bool,
          meta: bool):
  """(raw elements, {tag: sequence of undefined length}, whether the tags
  ascend, end, character set) of the elements from pos: the file meta group
  (meta=True), or the dataset up to the pixel data; None when an element is
  not one this reader takes."""
  elements: List[RawElement] = []
  sequences: Dict[int, Any] = {}
  append = elements.append
  ascending = True
  last = -1
  size = len(block)
  encoding = default_encoding
  while True:
    if pos + 8 > size:
      if whole_file and pos == size:
        return elements, sequences, ascending, pos, encoding
      return None
    if implicit:
      group, elem, length = _IMPLICIT_HEAD(block, pos)
      vr = None
      value_at = pos + 8
    else:
      group, elem, raw_vr, length = _EXPLICIT_HEAD(block, pos)
    if group in _GROUPS_TO_CHECK or meta:
      if meta:
        if group != 2:
          return elements, sequences, ascending, pos, encoding
      elif group << 16 | elem in _PIXEL_DATA_TAGS:
        return elements, sequences, ascending, pos, encoding
      elif group != 0x7FE0:
        return None   # a command set, a stray meta element, a delimiter
    tag = group << 16 | elem
    if tag <= last:
      ascending = False
    last = tag
    if not implicit:
      vr = _VR_TEXT.get(raw_vr)
      if vr is None:
        return None
      value_at = pos + 8
      if raw_vr in _LONG_LENGTH:
        if pos + 12 > size:
          return None
        length = _LENGTH_32(block, pos + 8)[0]
        value_at = pos + 12
    if length == _UNDEFINED_LENGTH:
      sequence, pos = _undefined_length_sequence(
          block, BaseTag(tag), vr, value_at, implicit, whole_file, encoding)
      if sequence is None:
        return None
      sequences[tag] = sequence
      value = None   # converted by pydicom, as any sequence
    else:
      pos = value_at + length
      if pos > size:
        return None
      value = (block[value_at:pos] if length
               else empty_value_for_VR(vr, raw=True))
      if tag == _CHARACTER_SET:   # the sequences after it are read with it
        encoding = convert_encodings(convert_string(value or b"", True))
    append((tag, vr, value, length, value_at))


def _undefined_length_sequence(block, tag, vr, value_at, implicit,
                               whole_file, encoding):
  """(the sequence element, its end) read by pydicom's read_sequence, as
  pydicom's reader does; (None, 0) for any other undefined length."""
  if implicit:
    try:
      vr = dictionary_VR(tag)
    except KeyError:
      return None, 0
  if vr != "SQ":
    return None, 0
  stream = io.BytesIO(block)
  stream.seek(value_at)
  try:
    sequence = read_sequence(stream, implicit, True, _UNDEFINED_LENGTH,
                             encoding)
  except Exception:  # pylint: disable=broad-except
    return None, 0   # pydicom's reader of the whole file says why
  end = stream.tell()
  if end >= len(block) and not whole_file:
    return None, 0   # may have run out of the block
  return DataElement(tag, vr, sequence, value_at,
                     is_undefined_length=True), end
