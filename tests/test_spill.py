"""Headers set aside while images are grouped (transforms/spill.py)."""
from __future__ import annotations

import dataclasses

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

import transforms.spill as spill
from conftest import local_pipeline
from pipeline.options import OptionsError
from pipeline.run import header_spill_dir
from transforms.records import (HeaderPart, ImageRecord, SourceFile,
                                SpilledHeader, pack_text)
from transforms.spill import (DeleteSpill, SpillHeaders, decode_part,
                              encode_part, header_parts, read_spilled)


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


def test_spilled_records_carry_only_where_their_header_is(tmp_path):
  folder = str(tmp_path / "spill")
  with local_pipeline() as p:
    spilled = (p | beam.Create([image_with_header(i) for i in range(20)])
               | SpillHeaders(folder))
    # Read after a grouping, as in the pipeline: a part is readable once the
    # bundle that wrote it is complete.
    assert_that(spilled | beam.Reshuffle() | beam.Map(
        lambda image: (image.sop_instance_uid,
                       isinstance(image.header, SpilledHeader),
                       read_spilled([image.header])[0])),
        equal_to([(f"1.2.3.{i}", True, header_part(i)) for i in range(20)]))
  assert list((tmp_path / "spill").glob("*.bin"))


def _write_parts(path, parts, gap=0):
  refs, offset = [], 0
  with open(path, "wb") as f:
    for part in parts:
      data = encode_part(part)
      f.write(b"\0" * gap + data)
      refs.append(SpilledHeader(str(path), offset + gap, len(data)))
      offset += gap + len(data)
  return refs


def test_parts_come_back_in_the_order_asked_with_few_reads(tmp_path,
                                                           monkeypatch):
  near = _write_parts(tmp_path / "near.bin", [header_part(i) for i in range(10)])
  far = _write_parts(tmp_path / "far.bin", [header_part(i) for i in range(10, 13)],
                     gap=spill.READ_GAP_BYTES + 1)
  reads, real_read = [], spill.read_range

  def counted(path, offset, length, gcs_client=None):
    reads.append((path, offset, length))
    return real_read(path, offset, length, gcs_client)

  monkeypatch.setattr(spill, "read_range", counted)
  asked = [far[2], near[5], near[0], far[0], near[9], far[1]]
  assert read_spilled(asked) == [header_part(12), header_part(5), header_part(0), header_part(10),
                                 header_part(9), header_part(11)]
  # One read for the adjacent parts, one per part beyond the gap.
  assert sorted((p.rsplit("/", 1)[-1], n) for p, _, n in reads) == sorted(
      [("near.bin", near[9].offset + near[9].length)] +
      [("far.bin", r.length) for r in far])


def test_header_parts_of_spilled_and_inline_records(tmp_path):
  refs = _write_parts(tmp_path / "a.bin", [header_part(i) for i in range(3)])
  images = [dataclasses.replace(image_with_header(i), header=refs[i])
            for i in range(3)]
  images.insert(1, image_with_header(7))   # not spilled: its own part
  assert header_parts(images) == [header_part(i) for i in (0, 7, 1, 2)]


def test_the_folder_is_deleted_once_its_readers_are_done(tmp_path):
  folder = tmp_path / "spill"
  folder.mkdir()
  (folder / "a.bin").write_bytes(b"x")
  with local_pipeline() as p:
    deleted = p | beam.Create([1, 2, 3]) | DeleteSpill(str(folder))
    assert_that(deleted, equal_to([str(folder)]))
  assert not folder.exists()
  spill.delete_spill(str(folder))   # already gone: nothing to do


def test_the_spill_folder_is_on_temp_location_and_of_this_run(tmp_path):
  options = PipelineOptions([f"--temp_location={tmp_path}"])
  assert header_spill_dir(options, "r1", local=True) == str(
      tmp_path / "dicomstore-headers-r1")
  remote = PipelineOptions(["--runner=DataflowRunner",
                            "--temp_location=gs://b/tmp"])
  assert header_spill_dir(remote, "r1", local=False) == (
      "gs://b/tmp/dicomstore-headers-r1")
  with pytest.raises(OptionsError, match="--temp_location is required"):
    header_spill_dir(PipelineOptions(["--runner=DataflowRunner"]), "r1",
                     local=False)
