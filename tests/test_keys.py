import pytest

from transforms.keys import (STUDY_DATE_PLACEHOLDER, STUDY_OBJECT_KEY_PATTERN,
                             UnsafeKeyComponent, check_collection,
                             check_key_component, study_date_component,
                             study_object_key, uid_short_id)


def test_study_object_key_follows_the_schema():
  key = study_object_key("IRB41449", "GL664ba0", "20070904", "GL71cfb7")
  assert key == ("Collection/IRB41449/Entity/GL664ba0/"
                 "GL664ba0_20070904_GL71cfb7.tar.gz")
  assert STUDY_OBJECT_KEY_PATTERN.match(key)


@pytest.mark.parametrize("value", ["", ".", "..", "a/b", "a\\b", "a\x00b",
                                   "tab\there", "x" * 201, None])
def test_unsafe_components_are_refused(value):
  with pytest.raises(UnsafeKeyComponent):
    check_key_component(value, "entity id")


@pytest.mark.parametrize("value", ["GL664ba0", "ACC 12", "é-1.2_3", "..a"])
def test_ordinary_components_pass(value):
  assert check_key_component(value, "item id") == value


@pytest.mark.parametrize("value", ["IRB-1", "", "a b", "x.y", None])
def test_collection_must_be_a_dataset_name(value):
  with pytest.raises(UnsafeKeyComponent):
    check_collection(value)


@pytest.mark.parametrize("raw,expected", [
    ("20070904", "20070904"), (" 20070904 ", "20070904"),
    ("20070931", STUDY_DATE_PLACEHOLDER), ("2007-09-04", STUDY_DATE_PLACEHOLDER),
    ("", STUDY_DATE_PLACEHOLDER), (None, STUDY_DATE_PLACEHOLDER),
    # Digits of other scripts are not a date for a key (only 0-9 are).
    ("\u0662\u0660\u0660\u0667\u0660\u0669\u0660\u0664", STUDY_DATE_PLACEHOLDER)])
def test_study_date_component(raw, expected):
  assert study_date_component(raw) == expected


def test_uid_short_id_is_stable_and_distinct():
  assert uid_short_id("1.2.3") == uid_short_id("1.2.3")
  assert uid_short_id("1.2.3") != uid_short_id("1.2.4")
  assert len(uid_short_id("1.2.3")) == 12
