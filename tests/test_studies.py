from apache_beam import Create, Map
from hypothesis import given, settings
from hypothesis import strategies as st
from apache_beam.testing.util import assert_that, equal_to

from conftest import local_pipeline
from transforms.dicom import image_record
from transforms.records import REJECTED, SourceFile
from transforms.studies import (GroupStudies, build_study,
                                drop_flagged_copies, naming_facts,
                                study_name_parts)


def _img(entity, relpath, study, sop, accession=None, date="20200102"):
  header = {"00080020": {"vr": "DA", "Value": [date]},
            "0020000D": {"vr": "UI", "Value": [study]},
            "0020000E": {"vr": "UI", "Value": [study + ".9"]},
            "00080018": {"vr": "UI", "Value": [sop]}}
  if accession is not None:
    header["00080050"] = {"vr": "SH", "Value": [accession]}
  return image_record(
      SourceFile(f"/in/{entity}/{relpath}", entity, relpath, 1), header)


def test_images_group_into_studies_with_their_object_keys():
  images = [_img("E1", "b.dcm", "1.1", "s2", "ACC1"),
            _img("E1", "a.dcm", "1.1", "s1", "ACC1"),
            _img("E2", "c.dcm", "2.1", "s3", None, date="bad")]
  with local_pipeline() as p:
    out = _group(p, images)
    assert_that(out["studies"] | Map(lambda s: (
        s.object_key, [i.source.relpath for i in s.images])), equal_to([
            ("Collection/C1/Entity/E1/E1_20200102_ACC1.tar.gz",
             ["a.dcm", "b.dcm"]),
            ("Collection/C1/Entity/E2/E2_00000000_uid"
             "a5ad9d8f6cf1.tar.gz".replace("a5ad9d8f6cf1", _short("2.1")),
             ["c.dcm"])]))


def _group(p, images, flagged=()):
  return {"images": p | "Images" >> Create(images),
          "flagged": p | "Flagged" >> Create(list(flagged))} | GroupStudies("C1")


def test_a_copy_of_a_flagged_instance_is_flagged_too():
  images = [_img("E1", "a.dcm", "1.1", "s1", "A"),
            _img("E1", "b.dcm", "1.1", "s2", "A")]
  flagged = [_img("E1", "PHI/a.dcm", "1.1", "s1", "A")]
  with local_pipeline() as p:
    out = _group(p, images, flagged)
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


def test_duplicate_sop_instances_keep_the_first_path():
  images = [_img("E1", "z.dcm", "1.1", "s1", "A"),
            _img("E1", "a.dcm", "1.1", "s1", "A")]
  with local_pipeline() as p:
    out = _group(p, images)
    assert_that(out["studies"] | Map(lambda s: [i.source.relpath
                                                for i in s.images]),
                equal_to([["a.dcm"]]), label="studies")
    assert_that(out["excluded"] | Map(lambda e: (e.path, e.status)),
                equal_to([("/in/E1/z.dcm", REJECTED)]), label="excluded")


def test_studies_that_would_share_a_name_both_survive():
  images = [_img("E1", "a.dcm", "1.1", "s1", "SAME"),
            _img("E1", "b.dcm", "1.2", "s2", "SAME")]
  with local_pipeline() as p:
    out = _group(p, images)
    assert_that(out["studies"] | Map(lambda s: s.item_id), equal_to([
        "SAME-" + _short("1.1")[:8], "SAME-" + _short("1.2")[:8]]))


def test_an_unsafe_item_id_rejects_the_study():
  images = [_img("E1", "a.dcm", "1.1", "s1", "../../etc")]
  with local_pipeline() as p:
    out = _group(p, images)
    assert_that(out["studies"], equal_to([]), label="studies")
    assert_that(out["excluded"] | Map(lambda e: e.reason), equal_to([
        "study 1.1 cannot be named: item id '../../etc' contains a path "
        "separator"]), label="excluded")


def test_a_name_shared_only_once_flagged_copies_are_dropped_is_told_apart():
  # Study 1.1 takes its item id from b.dcm, because a.dcm's instance is
  # flagged elsewhere; it then shares E1_..._ACC2 with study 1.2.
  images = [_img("E1", "a.dcm", "1.1", "s1", "ACC1"),
            _img("E1", "b.dcm", "1.1", "s2", "ACC2"),
            _img("E1", "c.dcm", "1.2", "s3", "ACC2")]
  flagged = [_img("E1", "PHI/a.dcm", "1.1", "s1", "ACC1")]
  with local_pipeline() as p:
    out = _group(p, images, flagged)
    assert_that(out["studies"] | Map(lambda s: s.item_id), equal_to([
        "ACC2-" + _short("1.1")[:8], "ACC2-" + _short("1.2")[:8]]))


_names = st.sampled_from(["a.dcm", "b.dcm", "c/d.dcm"])
_sops = st.sampled_from(["s1", "s2", "s3"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_names, _sops, st.sampled_from([None, "A", "B"]),
                          st.sampled_from(["20200102", "bad"]),
                          st.sampled_from(["/r1", "/r2"])), min_size=1,
                max_size=6),
       st.sets(_sops, max_size=2))
def test_the_name_index_names_each_study_as_it_is_built(files, flagged):
  # The index (naming facts only) and build_study (whole records) must
  # agree, or a collision could go unseen: same entity under two roots
  # included, so equal paths occur.
  images = [image_record(SourceFile(f"{root}/E1/{rel}", "E1", rel, 1), {
      "00080020": {"vr": "DA", "Value": [date]},
      "0020000D": {"vr": "UI", "Value": ["1.1"]},
      "00080018": {"vr": "UI", "Value": [sop]},
      **({"00080050": {"vr": "SH", "Value": [item]}} if item else {})})
            for rel, sop, item, date, root in files]
  expected = study_name_parts("1.1", map(naming_facts, images), flagged)
  kept, _ = drop_flagged_copies(images, {sop: "PHI" for sop in flagged})
  if not kept:
    assert expected is None
    return
  study, _ = build_study("C1", "E1", "1.1", kept)
  assert expected == (study.study_date, study.item_id)
