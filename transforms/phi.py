"""Flag images that may hold PHI in their pixels: they are never stored.

Rules are pluggable: each has a name and a check that returns a reason or
None. Path rules run before a file is even opened; header rules run on the
parsed header. The first matching rule's reason goes to the report.
Rules: folder (a PHI/ folder), header (BurnedInAnnotation=YES), deid (the
deid package's detector with its default or a given recipe).
"""

import os
import tempfile
from typing import Iterable, Optional, Sequence

import apache_beam as beam

from transforms.progress import Count
from transforms.records import FLAGGED, Excluded, ImageRecord, SourceFile

EXCLUDED_TAG = "excluded"
FLAGGED_TAG = "flagged"   # the flagged elements themselves, for GroupStudies
PHI_FOLDER = "PHI"


class PhiFolderRule:
  """The original system's quarantine: anything under a folder named PHI."""
  name = "folder"

  def check(self, source: SourceFile) -> Optional[str]:
    folders = source.relpath.split("/")[:-1]
    if PHI_FOLDER in folders:
      return f"lies under a '{PHI_FOLDER}' folder of its entity"
    return None


class BurnedInAnnotationRule:
  """The header says the pixels carry burned-in text."""
  name = "header"

  def check(self, image: ImageRecord) -> Optional[str]:
    value = image.burned_in_annotation
    if value is not None and value.strip().upper() == "YES":
      return "header BurnedInAnnotation is YES"
    return None


class DeidRecipeRule:
  """The `deid` package's burned-in pixel detector (has_burned_pixels).

  It judges from the header, by the recipe's %filter groups (by default
  deid's own 'dicom' recipe, after the MIRC CTP criteria): a hit in a
  blacklist or graylist group flags the image. deid is given the file's
  header as pydicom reads it (read again here, up to the pixel data): the
  exported header is keyed for researchers, and a rebuilt dataset could
  differ from the file in what a recipe looks at. A file that cannot be
  read again is flagged. A recipe file's text is read when the pipeline is
  built, so that workers need no access to the file.
  """
  name = "deid"

  def __init__(self, recipe_text: Optional[str] = None):
    self.recipe_text = recipe_text
    self._recipe = None
    self._gcsio = None

  def _load(self):
    from deid.config import DeidRecipe  # heavy import: only when enabled
    if self.recipe_text is None:
      return DeidRecipe("dicom")
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "deid.dicom")
      with open(path, "w", encoding="utf-8") as f:
        f.write(self.recipe_text)
      return DeidRecipe(path)

  def _read_header(self, path: str):
    import pydicom
    from transforms.dicom import open_source
    if path.startswith("gs://") and self._gcsio is None:
      from apache_beam.io.gcp.gcsio import GcsIO
      self._gcsio = GcsIO()
    with open_source(path, self._gcsio) as f:
      return pydicom.dcmread(f, stop_before_pixels=True, force=True)

  def check(self, image: ImageRecord) -> Optional[str]:
    from deid.dicom.pixels import has_burned_pixels
    if self._recipe is None:
      self._recipe = self._load()
    try:
      ds = self._read_header(image.source.path)
    except Exception as e:  # pylint: disable=broad-except
      return f"the header could not be read again for deid: {e}"
    result = has_burned_pixels(ds, deid=self._recipe)
    if not result["flagged"]:
      return None
    hits = "; ".join(f"{r['group']}: {r['reason'].strip()}"
                     for r in result["results"])
    return f"deid recipe {hits}"

  def __getstate__(self):
    return {"recipe_text": self.recipe_text, "_recipe": None, "_gcsio": None}


PATH_RULES = {"folder": PhiFolderRule}
HEADER_RULES = {"header": BurnedInAnnotationRule, "deid": DeidRecipeRule}
DEFAULT_RULES = ("folder", "header")


def check_rule_names(names: Sequence[str]) -> None:
  known = set(PATH_RULES) | set(HEADER_RULES)
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"--phi_rules: unknown rule(s) {', '.join(unknown)}; "
                     f"known: {', '.join(sorted(known))}")


class _ApplyRules(beam.DoFn):
  def __init__(self, rules, entity_of, path_of):
    self.rules = rules
    self.entity_of = entity_of
    self.path_of = path_of
    self.flagged = Count("files_flagged")

  def process(self, element) -> Iterable:
    for rule in self.rules:
      reason = rule.check(element)
      if reason:
        self.flagged.inc()
        yield beam.pvalue.TaggedOutput(EXCLUDED_TAG, Excluded(
            self.path_of(element), self.entity_of(element), FLAGGED,
            f"PHI rule '{rule.name}': {reason}"))
        yield beam.pvalue.TaggedOutput(FLAGGED_TAG, element)
        return
    yield element


def _source_path(s: SourceFile) -> str:
  return s.path


def _source_entity(s: SourceFile) -> str:
  return s.entity_id


def _image_path(i: ImageRecord) -> str:
  return i.source.path


def _image_entity(i: ImageRecord) -> str:
  return i.source.entity_id


class FlagPhiByPath(beam.PTransform):
  """SourceFile -> kept SourceFile (main), flagged Excluded ('excluded') and
  the flagged SourceFiles themselves ('flagged')."""

  def __init__(self, rule_names: Sequence[str] = DEFAULT_RULES):
    super().__init__()
    self.rules = [PATH_RULES[n]() for n in rule_names if n in PATH_RULES]

  def expand(self, files):
    return files | "ApplyPathRules" >> beam.ParDo(
        _ApplyRules(self.rules, _source_entity, _source_path)).with_outputs(
            EXCLUDED_TAG, FLAGGED_TAG, main="kept")


class FlagPhiByHeader(beam.PTransform):
  """ImageRecord -> kept ImageRecord (main), flagged Excluded ('excluded') and
  the flagged ImageRecords themselves ('flagged')."""

  def __init__(self, rule_names: Sequence[str] = DEFAULT_RULES,
               deid_recipe_text: Optional[str] = None):
    super().__init__()
    self.rules = [DeidRecipeRule(deid_recipe_text) if n == "deid"
                  else HEADER_RULES[n]()
                  for n in rule_names if n in HEADER_RULES]

  def expand(self, images):
    return images | "ApplyHeaderRules" >> beam.ParDo(
        _ApplyRules(self.rules, _image_entity, _image_path)).with_outputs(
            EXCLUDED_TAG, FLAGGED_TAG, main="kept")
