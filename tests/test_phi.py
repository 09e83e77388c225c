from apache_beam import Create, Map
from apache_beam.testing.util import assert_that, equal_to

from conftest import local_pipeline
from transforms.phi import FlagPhiByHeader, FlagPhiByPath
from transforms.dicom import image_record
from transforms.records import FLAGGED, SourceFile


def _src(relpath):
  return SourceFile(f"/in/E1/{relpath}", "E1", relpath, 10)


def _img(relpath, burned):
  header = {"0020000D": {"vr": "UI", "Value": ["1"]},
            "00080018": {"vr": "UI", "Value": [relpath]}}
  if burned is not None:
    header["00280301"] = {"vr": "CS", "Value": [burned]}
  return image_record(_src(relpath), header)


def test_phi_folder_at_any_depth_is_flagged():
  files = [_src("a.dcm"), _src("PHI/a.dcm"), _src("x/y/PHI/z/a.dcm"),
           _src("PHIX/a.dcm"), _src("phi/a.dcm"), _src("x/PHI.dcm")]
  with local_pipeline() as p:
    out = p | Create(files) | FlagPhiByPath()
    assert_that(out.kept | Map(lambda s: s.relpath),
                equal_to(["a.dcm", "PHIX/a.dcm", "phi/a.dcm", "x/PHI.dcm"]),
                label="kept")
    assert_that(out.excluded | Map(lambda e: (e.path, e.status)),
                equal_to([("/in/E1/PHI/a.dcm", FLAGGED),
                          ("/in/E1/x/y/PHI/z/a.dcm", FLAGGED)]),
                label="flagged")


def test_burned_in_annotation_yes_is_flagged_whatever_its_case():
  images = [_img("1", "YES"), _img("2", " yes "), _img("3", "NO"),
            _img("4", None), _img("5", "Yes")]
  with local_pipeline() as p:
    out = p | Create(images) | FlagPhiByHeader()
    assert_that(out.kept | Map(lambda i: i.sop_instance_uid),
                equal_to(["3", "4"]), label="kept")
    assert_that(out.excluded | Map(lambda e: e.reason),
                equal_to(["PHI rule 'header': header BurnedInAnnotation is YES"] * 3),
                label="flagged")


def test_rules_can_be_switched_off():
  with local_pipeline() as p:
    out = p | Create([_img("1", "YES")]) | FlagPhiByHeader(["folder"])
    assert_that(out.kept | Map(lambda i: i.sop_instance_uid), equal_to(["1"]))


def _ct_image(**attrs):
  import pydicom
  from pydicom.data import get_testdata_file
  from transforms.header_json import header_json
  ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
  for k, v in attrs.items():
    setattr(ds, k, v)
  return image_record(_src(f"{ds.Modality}.dcm"), header_json(ds))


def test_deid_rule_with_its_default_recipe():
  from transforms.phi import DeidRecipeRule
  rule = DeidRecipeRule()
  assert rule.check(_ct_image()) is None
  reason = rule.check(_ct_image(ImageType=["DERIVED", "SECONDARY"]))
  assert reason.startswith("deid recipe blacklist:")
  assert "DERIVED" in reason


RECIPE = """FORMAT dicom

%filter lab_screens

LABEL Any CT from our lab scanner
  contains Modality CT
"""


def test_deid_rule_with_a_recipe_file_flags_through_the_transform():
  with local_pipeline() as p:
    out = p | Create([_ct_image()]) | FlagPhiByHeader(
        ["deid"], deid_recipe_text=RECIPE)
    assert_that(out.kept, equal_to([]), label="kept")
    assert_that(out.excluded | Map(lambda e: e.reason), equal_to(
        ["PHI rule 'deid': deid recipe lab_screens: Modality contains CT"]),
        label="flagged")
