"""Images set aside while they are grouped (transforms/spill.py)."""
from __future__ import annotations

import dataclasses

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

import transforms.spill as spill
from conftest import local_pipeline
from transforms.records import (HeaderPart, ImageRecord, SourceFile,
                                SpilledHeader, pack_text)
from transforms.spill import (SpilledImages, SpillImages,
                              decode_part, encode_part, header_parts,
                              read_images, read_plan, read_spilled)


def header_part(i: int) -> HeaderPart:
  # Unicode in both halves: lengths are bytes, not characters.
  return HeaderPart(columns_json=f'{{"PatientName":"Ä{i}"}}',
                    header_packed=pack_text(f'{{"0010": "ü{i}"}}' * (i + 1)))


def image_with_header(i: int) -> ImageRecord:
  return ImageRecord(source=SourceFile(f"/in/E1/{i}.dcm", "E1", f"{i}.dcm", 9),
                     study_instance_uid="1.2", series_instance_uid="1.2.3",
                     sop_instance_uid=f"1.2.3.{i}", header=header_part(i))


def test_a_part_decodes_to_itself():
  for i in (0, 7):
    assert decode_part(encode_part(header_part(i))) == header_part(i)


def test_an_image_spilled_comes_back_whole_from_its_reference(tmp_path):
  folder = str(tmp_path)

  def read_back(spilled):
    image, ref = spilled
    assert len(ref) == spill.IMAGE_REF.size and isinstance(image.header,
                                                     SpilledHeader)
    (back,) = read_images(folder, [ref])
    assert back == image
    return dataclasses.replace(back, header=read_spilled([back.header])[0])

  with local_pipeline() as p:
    spilled = (p | beam.Create([image_with_header(i) for i in range(20)])
               | SpillImages(folder))
    # Read after a grouping, as in the pipeline: a record is readable once
    # the bundle that wrote it is complete.
    assert_that(spilled | beam.Reshuffle() | beam.Map(read_back),
                equal_to([image_with_header(i) for i in range(20)]))


def test_spilled_images_index_slice_and_iterate_in_chunks(tmp_path,
                                                          monkeypatch):
  monkeypatch.setattr(spill, "IMAGES_CHUNK", 4)
  fn = spill._SpillImages(str(tmp_path))  # pylint: disable=protected-access
  fn.start_bundle()
  pairs = [next(iter(fn.process(image_with_header(i)))) for i in range(10)]
  fn.finish_bundle()
  order = [7, 0, 3, 9, 1, 2, 8, 4, 6, 5]
  held = SpilledImages.of(str(tmp_path), (pairs[i][1] for i in order))
  wanted = [pairs[i][0] for i in order]
  assert len(held) == 10
  assert list(held) == wanted
  assert held[2:7] == wanted[2:7] and held[::-3] == wanted[::-3]
  assert held[0] == wanted[0] and held[-1] == wanted[-1]
  with pytest.raises(IndexError):
    held[10]  # pylint: disable=pointless-statement
  assert header_parts(held[:3]) == [header_part(i) for i in order[:3]]


def _write_parts(path, parts, gap=0):
  refs, offset = [], 0
  with open(path, "wb") as f:
    for part in parts:
      data = encode_part(part)
      f.write(b"\0" * gap + data)
      refs.append(SpilledHeader(str(path), offset + gap, len(data)))
      offset += gap + len(data)
  return refs


def test_parts_come_back_in_the_order_asked_with_few_reads(tmp_path):
  near = _write_parts(tmp_path / "near.bin",
                      [header_part(i) for i in range(10)])
  far = _write_parts(tmp_path / "far.bin",
                     [header_part(i) for i in range(10, 13)],
                     gap=spill.READ_GAP_BYTES + 1)
  asked = [far[2], near[5], near[0], far[0], near[9], far[1]]
  assert read_spilled(asked) == [header_part(i)
                                 for i in (12, 5, 0, 10, 9, 11)]
  # One read for the near parts (gaps between them read too), one per part
  # beyond the gap.
  plan = read_plan(asked)
  assert [(p.rsplit("/", 1)[-1], start, end) for p, start, end, _ in plan] == (
      [("far.bin", r.offset, r.offset + r.length) for r in far] +
      [("near.bin", 0, near[9].offset + near[9].length)])
  assert sorted(i for *_, indices in plan for i in indices) == list(range(6))


def test_a_cut_spill_file_is_an_error_not_a_wrong_header(tmp_path):
  refs = _write_parts(tmp_path / "a.bin", [header_part(i) for i in range(2)])
  with open(tmp_path / "a.bin", "r+b") as f:
    f.truncate(refs[1].offset + 3)
  with pytest.raises(IOError, match="spill file ends before byte"):
    read_spilled(refs)


def test_header_parts_of_spilled_and_inline_records(tmp_path):
  refs = _write_parts(tmp_path / "a.bin", [header_part(i) for i in range(3)])
  images = [dataclasses.replace(image_with_header(i), header=refs[i])
            for i in range(3)]
  images.insert(1, image_with_header(7))   # not spilled: its own part
  assert header_parts(images) == [header_part(i) for i in (0, 7, 1, 2)]
