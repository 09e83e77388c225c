"""Group kept images into studies and give each study its object key.

Groupings over small records only (never pixel data):
1. by (entity, StudyInstanceUID), with the study's flagged copies and
   current rows looked up in side inputs: one Study per study, duplicate
   SOP instances resolved, study date and item id chosen;
2. by (entity, object name), on an index of the built studies' names:
   two different studies that would get the same object name are told
   apart by a suffix derived from their UIDs, so neither overwrites the
   other and the outcome does not depend on processing order. Studies wait
   for the index to be complete; in a local run they wait by reference
   (transforms/spill.py), ~30 bytes per image.
"""

import dataclasses
import functools
from typing import (Any, Callable, Dict, Iterable, List, NamedTuple, Optional,
                    Sequence, Tuple)

import apache_beam as beam

from transforms.keys import (UnsafeKeyComponent, study_date_component,
                             study_object_key, study_object_name, uid_short_id)
from transforms.once import Once
from transforms.progress import Count
from transforms.records import (FLAGGED, REJECTED, Excluded, ImageRecord,
                                Study)
from transforms.spill import SpilledImages, SpillImages

EXCLUDED_TAG = "excluded"
DEFAULT_ITEM_KEYWORD = "AccessionNumber"


class NamingFacts(NamedTuple):
  """What orders an image in its study and names the study, per image."""
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


class StudyEntry(NamedTuple):
  """One image as its study is built: what orders and names it, and the
  image itself, or in a local run where it is spilled (its IMAGE_REF), so
  that a study's whole records need not be held while it is built."""
  facts: NamingFacts
  path: str
  image: Any
  size_bytes: int

  @property
  def sop_instance_uid(self) -> str:
    return self.facts.sop_instance_uid


def study_entry(image: ImageRecord, spilled_at: Optional[bytes] = None
                ) -> StudyEntry:
  return StudyEntry(naming_facts(image), image.source.path,
                    image if spilled_at is None else spilled_at,
                    image.source.size_bytes)


def _fact_order(fact: NamingFacts) -> tuple:
  """With the path after it, total: equal relative paths (one entity under
  two input roots) still sort the same way in every run."""
  return (fact.relpath, fact.sop_instance_uid, fact.study_date,
          fact.item_value or "")


def _first_copies(ordered: Iterable[StudyEntry]) -> Tuple[list, list]:
  """The first of each SOP instance in order, and (later copy, its first)
  pairs."""
  kept, later, first = [], [], {}
  for item in ordered:
    earlier = first.get(item.sop_instance_uid)
    if earlier is None:
      first[item.sop_instance_uid] = item
      kept.append(item)
    else:
      later.append((item, earlier))
  return kept, later


def build_study(collection: str, entity_id: str, study_uid: str,
                entries: Iterable[StudyEntry],
                hold: Callable[[Iterable[Any]], Sequence[ImageRecord]] = tuple
                ) -> Tuple[Study, List[Excluded]]:
  """One study from its images' entries (at least one); duplicates of a
  SOP instance are reported. hold makes the Study's images of the kept
  entries' images.

  Images are taken by path below the entity folder. Of several files with
  the same SOPInstanceUID, the first is kept, the others are rejected: a
  stored study never holds two copies of one instance. The study date is
  the first kept image's, the item id the first kept item value, else
  derived from the study UID. Raises UnsafeKeyComponent.
  """
  ordered = sorted(entries, key=lambda e: (_fact_order(e.facts), e.path))
  kept, later = _first_copies(ordered)
  duplicates = [Excluded(entry.path, entity_id, REJECTED,
                         f"duplicate SOPInstanceUID {entry.sop_instance_uid}: "
                         f"{first.facts.relpath} is stored instead")
                for entry, first in later]
  study_date = kept[0].facts.study_date
  item_id = next((e.facts.item_value for e in kept if e.facts.item_value),
                 "uid" + uid_short_id(study_uid))
  study = Study(entity_id=entity_id, study_instance_uid=study_uid,
                study_date=study_date, item_id=item_id,
                object_key=study_object_key(collection, entity_id, study_date,
                                            item_id),
                images=hold(entry.image for entry in kept),
                input_bytes=sum(entry.size_bytes for entry in kept))
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


def drop_flagged_copies(entity_id: str, entries: Iterable[StudyEntry],
                        flagged: Dict[str, str]
                        ) -> Tuple[List[StudyEntry], List[Excluded]]:
  """Defense in depth: when any copy of a SOP instance in this study was
  flagged (say one in PHI/ and one outside it), no copy of it is stored."""
  kept, dropped = [], []
  for entry in entries:
    flagged_path = flagged.get(entry.sop_instance_uid)
    if flagged_path is None:
      kept.append(entry)
    else:
      dropped.append(Excluded(
          entry.path, entity_id, FLAGGED,
          f"another copy of SOP instance {entry.sop_instance_uid} is "
          f"flagged ({flagged_path})"))
  return kept, dropped


class _BuildStudy(beam.DoFn):
  """Builds a study from its grouped images: the records themselves, or
  with spill_dir their references (transforms/spill.py), read back here and
  held by reference by the Study."""

  def __init__(self, collection: str, spill_dir: Optional[str] = None):
    self.collection = collection
    self.spill_dir = spill_dir
    self.flagged = Count("files_flagged")
    self.rejected = Count("files_rejected")
    self.built = Count("studies_built")
    self.kept = Count("images_kept")

  def process(self, keyed, flagged_by_study=None, current_by_study=None
              ) -> Iterable[Study]:
    """keyed: a study's images, with its flagged instances and current
    rows in side inputs; or, joined (no side inputs), {'images', 'flagged',
    'current'} of the study."""
    (entity_id, study_uid), grouped = keyed
    if flagged_by_study is None:
      grouped, flagged_pairs, current_rows = (
          grouped["images"], grouped["flagged"], grouped["current"])
    else:
      flagged_pairs = flagged_by_study[(entity_id, study_uid)]
      current_rows = current_by_study[(entity_id, study_uid)]
    if self.spill_dir:
      refs = list(grouped)
      if not refs:   # joined: flagged or stored, no image in this run
        return
      # Records read back a chunk at a time; only their entries are held.
      entries = [study_entry(image, ref) for image, ref in zip(
          SpilledImages.of(self.spill_dir, refs), refs)]
      hold = functools.partial(SpilledImages.of, self.spill_dir)
    else:
      entries, hold = [study_entry(image) for image in grouped], tuple
    flagged = dict(sorted(flagged_pairs))
    current = tuple(sorted(current_rows))
    entries, dropped = drop_flagged_copies(entity_id, entries, flagged)
    for excluded in dropped:
      self.flagged.inc()
      yield beam.pvalue.TaggedOutput(EXCLUDED_TAG, excluded)
    if not entries:
      return
    try:
      study, duplicates = build_study(self.collection, entity_id, study_uid,
                                      entries, hold)
    except UnsafeKeyComponent as e:
      self.rejected.inc(len(entries))
      for entry in entries:
        yield beam.pvalue.TaggedOutput(EXCLUDED_TAG, Excluded(
            entry.path, entity_id, REJECTED,
            f"study {study_uid} cannot be named: {e}"))
      return
    for excluded in duplicates:
      self.rejected.inc()
      yield beam.pvalue.TaggedOutput(EXCLUDED_TAG, excluded)
    self.built.inc()
    self.kept.inc(len(study.images))
    yield dataclasses.replace(study, current=current)


def _object_name(study: Study):
  """((entity, object name), (study uid, item id)) of a built study."""
  name = study_object_name(study.entity_id, study.study_date, study.item_id)
  return (study.entity_id, name), (study.study_instance_uid, study.item_id)


def _renames(keyed) -> Iterable[Tuple[Tuple[str, str], str]]:
  (entity_id, _), named = keyed
  named = list(named)
  return renames_for(entity_id, (uid for uid, _ in named), named[0][1])


def _apply_rename(study: Study, collection: str, renames: Dict) -> Study:
  new_item = renames.get((study.entity_id, study.study_instance_uid))
  return study if new_item is None else renamed(collection, study, new_item)


def _by_study(image: ImageRecord):
  return (image.source.entity_id, image.study_instance_uid), image


def _ref_by_study(image: ImageRecord, ref: bytes):
  return (image.source.entity_id, image.study_instance_uid), ref


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
  multi-input Flatten is materialized). With spill_dir (a local run), the
  images are set aside there, and only their references are grouped and
  held by the studies (transforms/spill.py); references being small, they
  are joined with the flagged instances and current rows in a
  CoGroupByKey instead, which spares the local runner a side-input lookup
  per study. Name collisions, which are rare, are found on a small
  (entity, object name) -> study uid index of the built studies, applied
  through a side input.
  """

  def __init__(self, collection: str, spill_dir: Optional[str] = None):
    super().__init__()
    self.collection = collection
    self.spill_dir = spill_dir

  def expand(self, inputs):
    pipeline = inputs["images"].pipeline
    current = inputs.get("current")
    if current is None:
      current = pipeline | "NoCurrentRows" >> Once([])
    flagged = inputs["flagged"] | "KeyFlaggedByStudy" >> beam.Map(
        _flagged_by_study)
    build = _BuildStudy(self.collection, self.spill_dir)
    if self.spill_dir:
      # References are small: joined with the flagged instances and current
      # rows, where a side input cost a lookup through the runner per study
      # (800 studies: ~0.6 s of the local run).
      refs = (inputs["images"]
              | "SpillImages" >> SpillImages(self.spill_dir)
              | "KeyByStudy" >> beam.MapTuple(_ref_by_study))
      built = (
          {"images": refs, "flagged": flagged, "current": current}
          | "GroupByStudy" >> beam.CoGroupByKey()
          | "BuildStudy" >> beam.ParDo(build).with_outputs(
              EXCLUDED_TAG, main="studies"))
    else:
      built = (
          inputs["images"]
          | "KeyByStudy" >> beam.Map(_by_study)
          | "GroupByStudy" >> beam.GroupByKey()
          | "BuildStudy" >> beam.ParDo(
              build, beam.pvalue.AsMultiMap(flagged),
              beam.pvalue.AsMultiMap(current)).with_outputs(
                  EXCLUDED_TAG, main="studies"))
    renames = (built.studies
               | "ObjectName" >> beam.Map(_object_name)
               | "GroupByObjectName" >> beam.GroupByKey()
               | "Renames" >> beam.FlatMap(_renames))
    studies = built.studies | "ApplyRenames" >> beam.Map(
        _apply_rename, self.collection, beam.pvalue.AsDict(renames))
    return {"studies": studies, EXCLUDED_TAG: built[EXCLUDED_TAG]}
