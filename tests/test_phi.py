from pathlib import Path

import pydicom
from apache_beam import Create, Map
from pydicom.data import get_testdata_file
from apache_beam.testing.util import assert_that, equal_to

from conftest import exported, local_pipeline
from transforms.phi import FlagPhiByHeader, FlagPhiByPath
from transforms.dicom import image_record, read_image_record
from transforms.records import FLAGGED, SourceFile


def _src(relpath):
  return SourceFile(f"/in/E1/{relpath}", "E1", relpath, 10)


def _img(relpath, burned):
  header = {"StudyInstanceUID": "1", "SOPInstanceUID": relpath}
  if burned is not None:
    header["BurnedInAnnotation"] = burned
  return image_record(_src(relpath), exported(header))


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


def _ct_image(folder, **attrs):
  """A CT image written to folder (the deid rule reads the file's header)."""
  ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
  for k, v in attrs.items():
    setattr(ds, k, v)
  path = folder / f"{len(list(folder.iterdir()))}.dcm"
  ds.save_as(path)
  with open(path, "rb") as f:
    return read_image_record(SourceFile(str(path), "E1", path.name,
                                        path.stat().st_size), f)


def test_deid_rule_with_its_default_recipe(tmp_path):
  from transforms.phi import DeidRecipeRule
  rule = DeidRecipeRule()
  assert rule.check(_ct_image(tmp_path)) is None
  reason = rule.check(_ct_image(tmp_path, ImageType=["DERIVED", "SECONDARY"]))
  assert reason.startswith("deid recipe blacklist:")
  assert "DERIVED" in reason


def test_deid_rule_flags_a_file_it_cannot_read_again(tmp_path):
  from transforms.phi import DeidRecipeRule
  image = _ct_image(tmp_path)
  Path(image.source.path).unlink()
  reason = DeidRecipeRule().check(image)
  assert reason.startswith("the header could not be read again for deid")


RECIPE = """FORMAT dicom

%filter lab_screens

LABEL Any CT from our lab scanner
  contains Modality CT
"""


def test_deid_rule_with_a_recipe_file_flags_through_the_transform(tmp_path):
  with local_pipeline() as p:
    out = p | Create([_ct_image(tmp_path)]) | FlagPhiByHeader(
        ["deid"], deid_recipe_text=RECIPE)
    assert_that(out.kept, equal_to([]), label="kept")
    assert_that(out.excluded | Map(lambda e: e.reason), equal_to(
        ["PHI rule 'deid': deid recipe lab_screens: Modality contains CT"]),
        label="flagged")
