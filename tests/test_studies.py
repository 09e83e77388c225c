import dataclasses

import pytest
from apache_beam import Create, Map
from apache_beam.testing.util import assert_that, equal_to

from conftest import exported, local_pipeline
from transforms.dicom import image_record
from transforms.records import REJECTED, SourceFile
from transforms.spill import SpilledImages, header_parts
from transforms.studies import GroupStudies


def _img(entity, relpath, study, sop, accession=None, date="20200102"):
  header = {"StudyDate": date, "StudyInstanceUID": study,
            "SeriesInstanceUID": study + ".9", "SOPInstanceUID": sop}
  if accession is not None:
    header["AccessionNumber"] = accession
  return image_record(
      SourceFile(f"/in/{entity}/{relpath}", entity, relpath, 1),
      exported(header))


def test_images_group_into_studies_with_their_object_keys(group):
  images = [_img("E1", "b.dcm", "1.1", "s2", "ACC1"),
            _img("E1", "a.dcm", "1.1", "s1", "ACC1"),
            _img("E2", "c.dcm", "2.1", "s3", None, date="bad")]
  with local_pipeline() as p:
    out = group(p, images)
    assert_that(out["studies"] | Map(lambda s: (
        s.object_key, [i.source.relpath for i in s.images])), equal_to([
            ("Collection/C1/Entity/E1/E1_20200102_ACC1.tar.gz",
             ["a.dcm", "b.dcm"]),
            ("Collection/C1/Entity/E2/E2_00000000_uid"
             "a5ad9d8f6cf1.tar.gz".replace("a5ad9d8f6cf1", _short("2.1")),
             ["c.dcm"])]))


@pytest.fixture(params=["records", "spilled"])
def group(request, tmp_path):
  """GroupStudies as a Dataflow run has it (the records are grouped) and as
  a local run has it (images spilled, their references grouped)."""
  spill_dir = None
  if request.param == "spilled":
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()

  def grouped(p, images, flagged=()):
    return {"images": p | "Images" >> Create(images),
            "flagged": p | "Flagged" >> Create(list(flagged))} | GroupStudies(
                "C1", spill_dir and str(spill_dir))
  return grouped


def test_a_copy_of_a_flagged_instance_is_flagged_too(group):
  images = [_img("E1", "a.dcm", "1.1", "s1", "A"),
            _img("E1", "b.dcm", "1.1", "s2", "A")]
  flagged = [_img("E1", "PHI/a.dcm", "1.1", "s1", "A")]
  with local_pipeline() as p:
    out = group(p, images, flagged)
    assert_that(out["studies"] | Map(lambda s: [i.sop_instance_uid
                                                for i in s.images]),
                equal_to([["s2"]]), label="studies")
    assert_that(out["excluded"] | Map(lambda e: (e.path, e.status, e.reason)),
                equal_to([("/in/E1/a.dcm", "flagged",
                           "another copy of SOP instance s1 is flagged "
                           "(/in/E1/PHI/a.dcm)")]), label="excluded")


def _short(uid):
  from transforms.keys import uid_short_id
  return uid_short_id(uid)


def test_duplicate_sop_instances_keep_the_first_path(group):
  images = [_img("E1", "z.dcm", "1.1", "s1", "A"),
            _img("E1", "a.dcm", "1.1", "s1", "A")]
  with local_pipeline() as p:
    out = group(p, images)
    assert_that(out["studies"] | Map(lambda s: [i.source.relpath
                                                for i in s.images]),
                equal_to([["a.dcm"]]), label="studies")
    assert_that(out["excluded"] | Map(lambda e: (e.path, e.status)),
                equal_to([("/in/E1/z.dcm", REJECTED)]), label="excluded")


def test_studies_that_would_share_a_name_both_survive(group):
  images = [_img("E1", "a.dcm", "1.1", "s1", "SAME"),
            _img("E1", "b.dcm", "1.2", "s2", "SAME")]
  with local_pipeline() as p:
    out = group(p, images)
    assert_that(out["studies"] | Map(lambda s: s.item_id), equal_to([
        "SAME-" + _short("1.1")[:8], "SAME-" + _short("1.2")[:8]]))


def test_an_unsafe_item_id_rejects_the_study(group):
  images = [_img("E1", "a.dcm", "1.1", "s1", "../../etc")]
  with local_pipeline() as p:
    out = group(p, images)
    assert_that(out["studies"], equal_to([]), label="studies")
    assert_that(out["excluded"] | Map(lambda e: e.reason), equal_to([
        "study 1.1 cannot be named: item id '../../etc' contains a path "
        "separator"]), label="excluded")


def test_a_name_shared_only_once_flagged_copies_are_dropped_is_told_apart(group):
  # Study 1.1 takes its item id from b.dcm, because a.dcm's instance is
  # flagged elsewhere; it then shares E1_..._ACC2 with study 1.2.
  images = [_img("E1", "a.dcm", "1.1", "s1", "ACC1"),
            _img("E1", "b.dcm", "1.1", "s2", "ACC2"),
            _img("E1", "c.dcm", "1.2", "s3", "ACC2")]
  flagged = [_img("E1", "PHI/a.dcm", "1.1", "s1", "ACC1")]
  with local_pipeline() as p:
    out = group(p, images, flagged)
    assert_that(out["studies"] | Map(lambda s: s.item_id), equal_to([
        "ACC2-" + _short("1.1")[:8], "ACC2-" + _short("1.2")[:8]]))


def test_a_local_run_studies_hold_their_images_by_reference(tmp_path):
  spill_dir = tmp_path / "spill"
  spill_dir.mkdir()
  images = [_img("E1", f"{i:02d}.dcm", "1.1", f"s{i}", "A") for i in range(30)]
  # Record and header read back from the spill, with the header's place.
  expected = [(dataclasses.replace(image, header=None), image.header)
              for image in images]

  def read_back(study):
    held = study.images
    assert isinstance(held, SpilledImages)
    assert len(held.refs) == 28 * len(images)   # ~30 bytes per image
    back = list(held)
    assert held[3] == back[3] and held[-1] == back[-1]
    return [(dataclasses.replace(image, header=None), part)
            for image, part in zip(back, header_parts(back))]

  with local_pipeline() as p:
    out = {"images": p | "Images" >> Create(images),
           "flagged": p | "Flagged" >> Create([])} | GroupStudies(
               "C1", str(spill_dir))
    assert_that(out["studies"] | Map(read_back), equal_to([expected]))
  # Each bundle's records and headers, side by side.
  assert {f.suffix for f in spill_dir.iterdir()} == {".rec", ".hdr"}
