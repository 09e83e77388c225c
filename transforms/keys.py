"""The object key schema: Collection/<collection>/Entity/<entity>/<entity>_<date>_<item>.tar.gz.

Every component that comes from data is checked here, so that no entity or
item id can escape its place in the key.
"""

import datetime
import hashlib
import re
from typing import Any, Optional

# A study without a (valid) StudyDate is stored under this date.
STUDY_DATE_PLACEHOLDER = "00000000"
ARCHIVE_SUFFIX = ".tar.gz"
# BigQuery dataset names: letters, digits, underscores; the collection names both.
COLLECTION_PATTERN = re.compile(r"^[A-Za-z0-9_]{1,1024}$")
_MAX_COMPONENT = 200


class UnsafeKeyComponent(ValueError):
  """A value from the data that cannot be used in an object key."""


def check_key_component(value: Optional[str], what: str) -> str:
  """Returns value if it is safe as one path component of a key, else raises.

  Unsafe: empty, '.', '..', containing '/', '\\' or control characters, or
  longer than 200 characters.
  """
  if value is None or value == "":
    raise UnsafeKeyComponent(f"{what} is empty")
  if value in (".", ".."):
    raise UnsafeKeyComponent(f"{what} {value!r} is a relative path step")
  if "/" in value or "\\" in value:
    raise UnsafeKeyComponent(f"{what} {value!r} contains a path separator")
  if any(ord(c) < 32 or ord(c) == 127 for c in value):
    raise UnsafeKeyComponent(f"{what} {value!r} contains control characters")
  if len(value) > _MAX_COMPONENT:
    raise UnsafeKeyComponent(
        f"{what} is {len(value)} characters long (at most {_MAX_COMPONENT})")
  return value


def check_collection(value: Optional[str]) -> str:
  if not value or not COLLECTION_PATTERN.match(value):
    raise UnsafeKeyComponent(
        f"collection {value!r} must be letters, digits and underscores "
        "(it names the BigQuery dataset)")
  return value


_YYYYMMDD = re.compile(r"[0-9]{8}\Z")


def calendar_date(value: Any) -> Optional[datetime.date]:
  """The day a DICOM DA value 'YYYYMMDD' names, or None for anything else.
  (No strptime: it costs ~10x more, on every image.)"""
  text = str(value).strip()
  if not _YYYYMMDD.match(text):
    return None
  try:
    return datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
  except ValueError:   # no such day
    return None


def study_date_component(study_date: Optional[str]) -> str:
  """YYYYMMDD when StudyDate is a real calendar date, else the placeholder."""
  if study_date and calendar_date(study_date):
    return study_date.strip()
  return STUDY_DATE_PLACEHOLDER


def uid_short_id(uid: str, length: int = 12) -> str:
  """A short stable identifier for a UID (hex of its SHA-256)."""
  return hashlib.sha256(uid.encode("utf-8")).hexdigest()[:length]


def study_object_name(entity_id: str, study_date: str, item_id: str) -> str:
  return f"{entity_id}_{study_date}_{item_id}{ARCHIVE_SUFFIX}"


def study_object_key(
    collection: str, entity_id: str, study_date: str, item_id: str) -> str:
  """The object key of one study, after checking each component."""
  check_collection(collection)
  check_key_component(entity_id, "entity id")
  check_key_component(item_id, "item id")
  return (f"Collection/{collection}/Entity/{entity_id}/"
          f"{study_object_name(entity_id, study_date, item_id)}")


STUDY_OBJECT_KEY_PATTERN = re.compile(
    r"^Collection/(?P<collection>[A-Za-z0-9_]+)/Entity/(?P<entity>[^/]+)/"
    r"(?P=entity)_(?P<date>\d{8})_(?P<item>[^/]+)\.tar\.gz$")


def join_uri(base: str, key: str) -> str:
  return base.rstrip("/") + "/" + key
