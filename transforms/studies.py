"""Group kept images into studies and give each study its object key.

Groupings over small records only (never pixel data):
1. by (entity, StudyInstanceUID), with the study's flagged copies and
   current rows looked up in side inputs: one Study per study, duplicate
   SOP instances resolved, study date and item id chosen;
2. by (entity, object name), on an index of names only: two different
   studies that would get the same object name are told apart by a suffix
   derived from their UIDs, so neither overwrites the other and the outcome
   does not depend on processing order. The index is computed from a few
   naming facts per image (path, SOP, date, item), grouped apart from the
   images themselves: were it computed from the built studies, every Study
   would have to be stored whole until the index is complete, instead of
   going straight on to the archive writer.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.keys import (UnsafeKeyComponent, study_date_component,
                             study_object_key, study_object_name, uid_short_id)
from transforms.records import (FLAGGED, REJECTED, Excluded, ImageRecord,
                                Study)

EXCLUDED_TAG = "excluded"
DEFAULT_ITEM_KEYWORD = "AccessionNumber"


class NamingFacts(NamedTuple):
  """What a study's object name depends on, per image."""
  relpath: str
  sop_instance_uid: str
  study_date: str              # YYYYMMDD, or the placeholder
  item_value: Optional[str]


def study_date_of(image: ImageRecord) -> str:
  """YYYYMMDD from the typed StudyDate column, or the placeholder."""
  iso = image.study_date
  return study_date_component(iso.replace("-", "") if iso else None)


def naming_facts(image: ImageRecord) -> NamingFacts:
  return NamingFacts(image.source.relpath, image.sop_instance_uid,
                     study_date_of(image), image.item_value)


def _fact_order(fact: NamingFacts) -> tuple:
  """Total, so that equal paths (one entity under two input roots) still
  sort the same way in the index and in build_study."""
  return (fact.relpath, fact.sop_instance_uid, fact.study_date,
          fact.item_value or "")


def _first_copies(ordered: Iterable) -> Tuple[list, list]:
  """The first of each SOP instance in order, and (later copy, its first)
  pairs: records with a sop_instance_uid (ImageRecord, NamingFacts)."""
  kept, later, first = [], [], {}
  for item in ordered:
    earlier = first.get(item.sop_instance_uid)
    if earlier is None:
      first[item.sop_instance_uid] = item
      kept.append(item)
    else:
      later.append((item, earlier))
  return kept, later


def study_name_parts(study_uid: str, facts: Iterable[NamingFacts],
                     flagged_sops: Iterable[str] = ()
                     ) -> Optional[Tuple[str, str]]:
  """(study date, item id) of a study, None when no image is kept. Images
  are taken by path below the entity folder, skipping flagged SOP instances
  and later copies of one instance (as build_study keeps them); the date is
  the first image's, the item id the first item value, else UID-derived."""
  flagged = set(flagged_sops)
  kept, _ = _first_copies(fact for fact in sorted(facts, key=_fact_order)
                          if fact.sop_instance_uid not in flagged)
  if not kept:
    return None
  item_id = next((f.item_value for f in kept if f.item_value),
                 "uid" + uid_short_id(study_uid))
  return kept[0].study_date, item_id


def build_study(collection: str, entity_id: str, study_uid: str,
                images: Iterable[ImageRecord]) -> Tuple[Study, List[Excluded]]:
  """One study from its images; duplicates of a SOP instance are reported.

  Of several files with the same SOPInstanceUID, the one with the smallest
  path below the entity folder is kept, the others are rejected: a stored
  study never holds two copies of one instance.
  """
  # Each image's naming facts once: they order the images, and the same
  # study_name_parts the naming index uses names the study from them.
  with_facts = sorted(((naming_facts(image), image) for image in images),
                      key=lambda pair: (_fact_order(pair[0]),
                                        pair[1].source.path))
  kept, later = _first_copies(image for _, image in with_facts)
  duplicates = [Excluded(image.source.path, entity_id, REJECTED,
                         f"duplicate SOPInstanceUID {image.sop_instance_uid}: "
                         f"{first.source.relpath} is stored instead")
                for image, first in later]
  study_date, item_id = study_name_parts(study_uid,
                                         (fact for fact, _ in with_facts))
  study = Study(entity_id=entity_id, study_instance_uid=study_uid,
                study_date=study_date, item_id=item_id,
                object_key=study_object_key(collection, entity_id, study_date,
                                            item_id),
                images=tuple(kept))
  return study, duplicates


def renames_for(entity_id: str, study_uids: Iterable[str], item_id: str
                ) -> List[Tuple[Tuple[str, str], str]]:
  """Studies that would share one object name each get '-<uid hash>' on
  their item id: ((entity, study uid), new item id) for each of them."""
  uids = sorted(set(study_uids))
  if len(uids) <= 1:
    return []
  return [((entity_id, uid), f"{item_id}-{uid_short_id(uid, 8)}")
          for uid in uids]


def renamed(collection: str, study: Study, item_id: str) -> Study:
  return dataclasses.replace(study, item_id=item_id, object_key=study_object_key(
      collection, study.entity_id, study.study_date, item_id))


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

  def process(self, keyed, renames, flagged_by_study, current_by_study
              ) -> Iterable:
    (entity_id, study_uid), images = keyed
    flagged = dict(sorted(flagged_by_study[(entity_id, study_uid)]))
    current = tuple(sorted(current_by_study[(entity_id, study_uid)]))
    images, dropped = drop_flagged_copies(list(images), flagged)
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
    yield dataclasses.replace(
        _apply_rename(study, self.collection, renames), current=current)


def _object_name(keyed) -> Iterable:
  """From one study's naming facts and flagged instances: small
  ((entity, object name), (study uid, item id)), as _BuildStudy will name it."""
  (entity_id, study_uid), grouped = keyed
  parts = study_name_parts(study_uid, grouped["images"],
                           (sop for sop, _ in grouped["flagged"]))
  if parts is None:
    return
  study_date, item_id = parts
  try:
    name = study_object_name(entity_id, study_date, item_id)
  except UnsafeKeyComponent:
    return   # _BuildStudy rejects its images, with the reason
  yield (entity_id, name), (study_uid, item_id)


def _renames(keyed) -> Iterable[Tuple[Tuple[str, str], str]]:
  (entity_id, _), named = keyed
  named = list(named)
  return renames_for(entity_id, (uid for uid, _ in named), named[0][1])


def _apply_rename(study: Study, collection: str, renames: Dict) -> Study:
  new_item = renames.get((study.entity_id, study.study_instance_uid))
  return study if new_item is None else renamed(collection, study, new_item)


def _by_study(image: ImageRecord):
  return (image.source.entity_id, image.study_instance_uid), image


def _naming_by_study(image: ImageRecord):
  return ((image.source.entity_id, image.study_instance_uid),
          naming_facts(image))


def _flagged_by_study(image: ImageRecord):
  return ((image.source.entity_id, image.study_instance_uid),
          (image.sop_instance_uid, image.source.path))


class GroupStudies(beam.PTransform):
  """{'images': kept ImageRecords, 'flagged': flagged ImageRecords,
  'current': current rows keyed by (entity, study uid), optional} ->
  {'studies': Study, 'excluded': Excluded}.

  The images cross one shuffle only, a GroupByKey of theirs alone: flagged
  instances and current rows, small tuples, reach each study through
  side inputs looked up by study, since joining them in a CoGroupByKey
  made the local runner copy every image record once more (its
  multi-input Flatten is materialized). Name collisions, which are rare,
  are found on a small (entity, object name) -> study uid index, built
  from naming facts alone, and applied through a side input as each
  study is built, so whole studies are neither shuffled nor stored again.
  """

  def __init__(self, collection: str):
    super().__init__()
    self.collection = collection

  def expand(self, inputs):
    pipeline = inputs["images"].pipeline
    current = inputs.get("current")
    if current is None:
      current = pipeline | "NoCurrentRows" >> beam.Create([])
    flagged = inputs["flagged"] | "KeyFlaggedByStudy" >> beam.Map(
        _flagged_by_study)
    renames = (
        {"images": inputs["images"] | "NamingFacts" >> beam.Map(
            _naming_by_study),
         "flagged": flagged}
        | "GroupNamingFacts" >> beam.CoGroupByKey()
        | "ObjectName" >> beam.FlatMap(_object_name)
        | "GroupByObjectName" >> beam.GroupByKey()
        | "Renames" >> beam.FlatMap(_renames))
    built = (
        inputs["images"]
        | "KeyByStudy" >> beam.Map(_by_study)
        | "GroupByStudy" >> beam.GroupByKey()
        | "BuildStudy" >> beam.ParDo(
            _BuildStudy(self.collection),
            beam.pvalue.AsDict(renames), beam.pvalue.AsMultiMap(flagged),
            beam.pvalue.AsMultiMap(current)).with_outputs(
                EXCLUDED_TAG, main="studies"))
    return {"studies": built.studies, EXCLUDED_TAG: built[EXCLUDED_TAG]}
