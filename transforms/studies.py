"""Group kept images into studies and give each study its object key.

Two groupings, both over small records only:
1. by (entity, StudyInstanceUID): one Study per study, duplicate SOP instances
   resolved, study date and item id chosen;
2. by (entity, object name): two different studies that would get the same
   object name are told apart by a suffix derived from their UIDs, so neither
   overwrites the other and the outcome does not depend on processing order.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Tuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.keys import (UnsafeKeyComponent, study_date_component,
                             study_object_key, study_object_name, uid_short_id)
from transforms.records import (FLAGGED, REJECTED, Excluded, ImageRecord,
                                Study)

EXCLUDED_TAG = "excluded"
DEFAULT_ITEM_KEYWORD = "AccessionNumber"


def item_id_for(images: List[ImageRecord], study_uid: str) -> str:
  """The study's item id: the item keyword's value (from the first image
  that has one), else a UID-derived id."""
  for image in images:
    if image.item_value:
      return image.item_value
  return "uid" + uid_short_id(study_uid)


def study_date_of(image: ImageRecord) -> str:
  """YYYYMMDD from the typed StudyDate column, or the placeholder."""
  iso = image.columns.get("StudyDate")
  return study_date_component(iso.replace("-", "") if iso else None)


def build_study(collection: str, entity_id: str, study_uid: str,
                images: Iterable[ImageRecord]) -> Tuple[Study, List[Excluded]]:
  """One study from its images; duplicates of a SOP instance are reported.

  Of several files with the same SOPInstanceUID, the one with the smallest
  path below the entity folder is kept, the others are rejected: a stored
  study never holds two copies of one instance.
  """
  ordered = sorted(images, key=lambda i: i.source.relpath)
  kept, duplicates, seen = [], [], {}
  for image in ordered:
    first = seen.get(image.sop_instance_uid)
    if first is not None:
      duplicates.append(Excluded(
          image.source.path, entity_id, REJECTED,
          f"duplicate SOPInstanceUID {image.sop_instance_uid}: "
          f"{first.source.relpath} is stored instead"))
      continue
    seen[image.sop_instance_uid] = image
    kept.append(image)
  study_date = study_date_of(kept[0])
  item_id = item_id_for(kept, study_uid)
  study = Study(entity_id=entity_id, study_instance_uid=study_uid,
                study_date=study_date, item_id=item_id,
                object_key=study_object_key(collection, entity_id, study_date,
                                            item_id),
                images=tuple(kept))
  return study, duplicates


def disambiguate(collection: str, studies: List[Study]) -> List[Study]:
  """Studies sharing one object name each get '-<uid hash>' on the item id."""
  if len({s.study_instance_uid for s in studies}) <= 1:
    return studies
  renamed = []
  for s in sorted(studies, key=lambda s: s.study_instance_uid):
    item_id = f"{s.item_id}-{uid_short_id(s.study_instance_uid, 8)}"
    renamed.append(dataclasses.replace(
        s, item_id=item_id, object_key=study_object_key(
            collection, s.entity_id, s.study_date, item_id)))
  return renamed


def drop_flagged_copies(images: List[ImageRecord], flagged: Dict[str, str]
                        ) -> Tuple[List[ImageRecord], List[Excluded]]:
  """Defense in depth: when any copy of a SOP instance in this study was
  flagged (say one in PHI/ and one outside it), no copy of it is stored."""
  kept, dropped = [], []
  for image in images:
    flagged_path = flagged.get(image.sop_instance_uid)
    if flagged_path is None:
      kept.append(image)
    else:
      dropped.append(Excluded(
          image.source.path, image.source.entity_id, FLAGGED,
          f"another copy of SOP instance {image.sop_instance_uid} is "
          f"flagged ({flagged_path})"))
  return kept, dropped


class _BuildStudy(beam.DoFn):
  def __init__(self, collection: str):
    self.collection = collection
    self.duplicates = Metrics.counter("studies", "duplicate_instances")

  def process(self, keyed) -> Iterable:
    (entity_id, study_uid), grouped = keyed
    flagged = dict(sorted(grouped["flagged"]))
    images, dropped = drop_flagged_copies(list(grouped["images"]), flagged)
    for excluded in dropped:
      yield beam.pvalue.TaggedOutput(EXCLUDED_TAG, excluded)
    if not images:
      return
    try:
      study, duplicates = build_study(self.collection, entity_id, study_uid,
                                      images)
    except UnsafeKeyComponent as e:
      for image in images:
        yield beam.pvalue.TaggedOutput(EXCLUDED_TAG, Excluded(
            image.source.path, entity_id, REJECTED,
            f"study {study_uid} cannot be named: {e}"))
      return
    for excluded in duplicates:
      self.duplicates.inc()
      yield beam.pvalue.TaggedOutput(EXCLUDED_TAG, excluded)
    yield study


class _Disambiguate(beam.DoFn):
  def __init__(self, collection: str):
    self.collection = collection

  def process(self, keyed) -> Iterable[Study]:
    _, studies = keyed
    yield from disambiguate(self.collection, list(studies))


def _by_study(image: ImageRecord):
  return (image.source.entity_id, image.study_instance_uid), image


def _flagged_by_study(image: ImageRecord):
  return ((image.source.entity_id, image.study_instance_uid),
          (image.sop_instance_uid, image.source.path))


def _by_object_name(study: Study):
  return (study.entity_id, study_object_name(
      study.entity_id, study.study_date, study.item_id)), study


class GroupStudies(beam.PTransform):
  """{'images': kept ImageRecords, 'flagged': flagged ImageRecords} ->
  {'studies': Study, 'excluded': Excluded}."""

  def __init__(self, collection: str):
    super().__init__()
    self.collection = collection

  def expand(self, inputs):
    built = (
        {"images": inputs["images"] | "KeyByStudy" >> beam.Map(_by_study),
         "flagged": inputs["flagged"]
                    | "KeyFlaggedByStudy" >> beam.Map(_flagged_by_study)}
        | "GroupByStudy" >> beam.CoGroupByKey()
        | "BuildStudy" >> beam.ParDo(
            _BuildStudy(self.collection)).with_outputs(
                EXCLUDED_TAG, main="studies"))
    studies = (
        built.studies
        | "KeyByObjectName" >> beam.Map(_by_object_name)
        | "GroupByObjectName" >> beam.GroupByKey()
        | "Disambiguate" >> beam.ParDo(_Disambiguate(self.collection)))
    return {"studies": studies, EXCLUDED_TAG: built[EXCLUDED_TAG]}
