"""The header reader for common Part 10 files (transforms/part10.py) gives
what pydicom's dcmread(stop_before_pixels=True) gives, element for element,
on every file pydicom ships; everything else is left to pydicom."""
import io
import os
import random

import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataelem import RawDataElement

import transforms.header_json as header_json_module
from transforms.header_json import export_by_pydicom, export_header
from transforms.part10 import part10_header, read_part10_header

BLOCK = 64 * 1024

pytestmark = pytest.mark.usefixtures("ignore_invalid_values")


def _pydicom_read(path):
  """pydicom's dataset, transfer syntax and where it stopped reading."""
  with open(path, "rb") as f:
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    return ds, str(ds.file_meta.get("TransferSyntaxUID")), f.tell()


def _raw_fields(element):
  return (int(element.tag), element.VR, element.length, element.value,
          element.value_tell, element.is_implicit_VR, element.is_little_endian)


def test_same_as_pydicom_on_every_file_pydicom_ships():
  read_here = undefined_sequences = 0
  for path in get_testdata_files():
    if not os.path.isfile(path):
      continue
    with open(path, "rb") as f:
      header = read_part10_header(f, BLOCK)
      end = f.tell()
    if header is None:
      assert end == 0, path   # left at the start for pydicom
      continue
    read_here += 1
    ds, syntax, pydicom_end = _pydicom_read(path)
    assert (header.transfer_syntax_uid, header.end, end) == (
        syntax, pydicom_end, pydicom_end), path
    assert list(header.dataset.keys()) == list(ds.keys()), path
    for tag in ds.keys():
      ours, theirs = header.dataset.get_item(tag), ds.get_item(tag)
      if isinstance(theirs, RawDataElement):
        assert _raw_fields(ours) == _raw_fields(theirs), (path, tag)
      elif theirs.VR == "SQ" and theirs.is_undefined_length:
        # read by pydicom's read_sequence here too
        assert not isinstance(ours, RawDataElement), (path, tag)
        assert ours.is_undefined_length and ours.value == theirs.value, (
            path, tag)
        undefined_sequences += 1
      else:   # converted by pydicom while it made its dataset (charset)
        assert header.dataset[tag].value == theirs.value, (path, tag)
    assert header.dataset.original_encoding == ds.original_encoding, path
    assert header.dataset._character_set == ds._character_set, path  # pylint: disable=protected-access
    # The exported header, which is what the pipeline keeps of it: from the
    # raw elements (twice: the second from the caches), and from the dataset.
    exported = export_header(header.dataset)
    assert exported == export_header(_pydicom_read(path)[0]), path
    assert exported == export_by_pydicom(_pydicom_read(path)[0]), path
    for _ in range(2):
      with open(path, "rb") as f:
        assert read_part10_header(f, BLOCK).export() == exported, path
  # Most files are read here (the rest: no preamble, big endian, deflated,
  # implicit VR data under an explicit VR syntax, broken on purpose ...),
  # sequences of undefined length among them.
  assert read_here > 130   # of 176 files
  assert undefined_sequences > 20


@pytest.mark.parametrize("name, why", [
    ("MR_small_bigendian.dcm", "big endian"),
    ("image_dfl.dcm", "deflated"),
    ("no_meta.dcm", "no preamble"),
    ("SC_rgb_jpeg.dcm", "implicit VR data under an explicit VR syntax"),
])
def test_left_to_pydicom(name, why):
  with open(get_testdata_file(name), "rb") as f:
    assert read_part10_header(f, BLOCK) is None, why
    assert f.tell() == 0


def test_a_header_longer_than_the_block_is_left_to_pydicom():
  path = get_testdata_file("CT_small.dcm")
  _, _, header_end = _pydicom_read(path)
  with open(path, "rb") as f:
    assert read_part10_header(f, header_end - 100) is None
    assert f.tell() == 0
  with open(path, "rb") as f:   # a block that holds the header is enough
    assert read_part10_header(f, header_end + 8).end == header_end


def test_a_file_cut_inside_its_header_is_left_to_pydicom():
  with open(get_testdata_file("CT_small.dcm"), "rb") as f:
    data = f.read()
  _, _, header_end = _pydicom_read(get_testdata_file("CT_small.dcm"))
  for cut in (131, 140, 300, header_end // 2, header_end - 3):
    assert part10_header(data[:cut], whole_file=True) is None, cut


def test_a_header_without_pixel_data_ends_at_the_file_end():
  with open(get_testdata_file("CT_small.dcm"), "rb") as f:
    data = f.read()
  _, _, header_end = _pydicom_read(get_testdata_file("CT_small.dcm"))
  header = part10_header(data[:header_end], whole_file=True)
  assert header.end == header_end
  assert part10_header(data[:header_end], whole_file=False) is None
  assert header.dataset.SOPInstanceUID == pydicom.dcmread(
      io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID


def test_a_command_set_is_left_to_pydicom():
  # A group 0000 element (Command Group Length) before the dataset: pydicom
  # reads it separately and merges it in.
  with open(get_testdata_file("CT_small.dcm"), "rb") as f:
    data = f.read()
  _, _, header_end = _pydicom_read(get_testdata_file("CT_small.dcm"))
  meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
  command = (b"\x00\x00\x00\x00UL\x04\x00" + (0).to_bytes(4, "little"))
  patched = data[:meta_end] + command + data[meta_end:]
  assert part10_header(patched, whole_file=True) is None


class _ShortFirstRead(io.BytesIO):
  """A stream whose first read returns only the first `first` bytes."""

  def __init__(self, data, first):
    super().__init__(data)
    self.first = first

  def read(self, size=-1):
    if self.first:
      size, self.first = self.first, None
    return super().read(size)


def test_a_short_read_is_not_taken_for_the_whole_file():
  path = get_testdata_file("CT_small.dcm")
  with open(path, "rb") as f:
    data = f.read()
  # A first read that ends exactly where an element ends, inside the
  # header: taken for the whole file, it would read as a shorter header.
  element = pydicom.dcmread(path, stop_before_pixels=True).get_item(0x00200032)
  cut = element.value_tell + element.length
  assert part10_header(data[:cut], whole_file=True) is not None
  stream = _ShortFirstRead(data, cut)
  assert read_part10_header(stream, BLOCK) is None
  assert stream.tell() == 0
  assert read_part10_header(io.BytesIO(data), BLOCK).end == _pydicom_read(
      path)[2]


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm",
                                  "JPEG2000.dcm"])
def test_damaged_headers_read_as_pydicom_reads_them_or_go_to_pydicom(name):
  # Bytes overwritten at random inside the header: this reader either
  # leaves the file to pydicom or gives exactly pydicom's header.
  path = get_testdata_file(name)
  with open(path, "rb") as f:
    data = f.read()
  header_end = _pydicom_read(path)[2]
  rng = random.Random(name)
  read_here = 0
  for _ in range(100):
    damaged = bytearray(data)
    for _ in range(rng.randint(1, 4)):
      damaged[rng.randrange(128, header_end)] = rng.randrange(256)
    header = read_part10_header(io.BytesIO(bytes(damaged)), BLOCK)
    if header is None:
      continue
    try:
      expected = export_header(pydicom.dcmread(
          io.BytesIO(bytes(damaged)), stop_before_pixels=True)).text
    except Exception:  # pylint: disable=broad-except
      # pydicom cannot read or export it: neither can this reader's
      # dataset be exported, so the file is rejected either way.
      with pytest.raises(Exception):
        export_header(header.dataset)
      continue
    assert export_header(header.dataset).text == expected
    read_here += 1
  assert read_here > 30


def _part10_bytes(ds: pydicom.Dataset) -> bytes:
  ds.file_meta = pydicom.dataset.FileMetaDataset()
  ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
  ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
  ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
  out = io.BytesIO()
  ds.save_as(out, enforce_file_format=True)
  return out.getvalue()


def test_a_sequence_is_converted_once_per_value_and_context(monkeypatch):
  """The same raw sequence under another character set is another value:
  byte 0xA3 in a name is a pound sign in Latin-1, an L with stroke in
  Latin-2. Each file's export equals pydicom's, read after the other."""
  monkeypatch.setattr(header_json_module, "_sequence_cache", {})
  item = pydicom.Dataset()
  item.add_new(0x00100010, "PN", b"Sm\xa3th^Jo")   # PatientName, raw bytes
  ds = pydicom.Dataset()
  ds.SpecificCharacterSet = "ISO_IR 100"
  ds.StudyInstanceUID = "1.2.3"
  ds.OtherPatientIDsSequence = pydicom.Sequence([item])
  latin1 = _part10_bytes(ds)
  latin2 = latin1.replace(b"ISO_IR 100", b"ISO_IR 101")
  assert latin2 != latin1
  exports = []
  for data in (latin1, latin2, latin1):
    header = part10_header(data, whole_file=True)
    assert header is not None   # a defined-length sequence, read here
    exported = header.export()
    assert exported == export_header(pydicom.dcmread(io.BytesIO(data)))
    exports.append(exported.header["OtherPatientIDsSequence"][0]
                   ["PatientName"])
  assert exports == ["Sm\u00a3th^Jo", "Sm\u0141th^Jo", "Sm\u00a3th^Jo"]
  assert len(header_json_module._sequence_cache) == 2


def test_the_sequence_cache_stays_bounded_and_exact(monkeypatch):
  monkeypatch.setattr(header_json_module, "_sequence_cache", {})
  monkeypatch.setattr(header_json_module, "_SEQUENCE_ENTRIES", 3)
  compared = 0
  for _ in range(2):
    for path in get_testdata_files():
      if not os.path.isfile(path):
        continue
      with open(path, "rb") as f:
        header = read_part10_header(f, BLOCK)
      if header is None:
        continue
      assert header.export() == export_header(header.dataset), path
      assert len(header_json_module._sequence_cache) <= 3
      compared += 1
  assert compared > 260
