"""The run report: every input file accounted for, and the totals.

It is assembled inside the pipeline from the excluded files, the stored
studies and the row counts, and written once as JSON. The driver prints
its summary when the run ends. Stored files, most of a run's files, are
listed apart, in JSON-lines files beside the report written as studies
are stored (stored_listing): the report itself, and the memory that
builds it, grow with the run's studies and bad files, not its images.
"""

import collections
import json
import posixpath
from typing import Any, Dict, List, Optional, Tuple, Union

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from transforms.keys import ARCHIVE_SUFFIX, join_uri
from transforms.once import Once
from transforms.records import (COMPLETE_ROWS, FAILED, FLAGGED, REJECTED,
                                SKIP, WRITE, Excluded, PlannedStudy,
                                RecordedStudy, StoredStudy, duration)
from transforms.sinks import json_line, write_text_file

STORED_PREFIX = "stored-"


# A study's outcome in the report: in a run, and in a plan (--plan).
WRITTEN, ROWS_COMPLETED, SKIPPED = "written", "rows completed", "skipped"
PLANNED = {WRITE: "to write", COMPLETE_ROWS: "to complete rows",
           SKIP: "to skip"}


def stored_listing(report_path: str, run_id: str) -> str:
  """The stored listing's folder, beside the report."""
  return join_uri(posixpath.dirname(report_path), STORED_PREFIX + run_id)


def list_study(done: Union[StoredStudy, PlannedStudy, RecordedStudy],
               listing: str,
               outcome: Optional[str] = None) -> Tuple[str, Dict[str, Any]]:
  """Writes the study's lines of the stored listing (each image's input
  path, its study object and its member there; for a plan, where they
  would be) in one file per study object, named after it, written whole,
  so a retried bundle rewrites the same file (no temporary files to
  rename, which Cloud Storage does by copying). Returns the report's fact
  of the study: small, nothing per image, its images counted by modality
  in the same pass over them. outcome: by default, what happened to it
  (or what a plan decided)."""
  if isinstance(done, RecordedStudy):   # not read again: as recorded
    entity, study_uid = done.entity_id, done.study_instance_uid
    uri, size, md5 = done.uri, done.size_bytes, done.md5_hash
    files = ((path, member, modality, size_bytes)
             for path, member, _, modality, size_bytes in done.files)
    outcome = outcome or SKIPPED
  else:
    study = done.study
    entity, study_uid = study.entity_id, study.study_instance_uid
    if isinstance(done, PlannedStudy):
      uri, members = done.uri, (study.member_name(i) for i in study.images)
      size, md5 = None, None
      outcome = outcome or PLANNED[done.action]
    else:
      uri, members = done.location.uri, (m.member for m in done.members)
      size, md5 = done.location.size_bytes, done.location.md5_hash
      outcome = outcome or (ROWS_COMPLETED if done.rows_completed
                            else WRITTEN)
    files = ((image.source.path, member, image.modality,
              image.source.size_bytes)
             for image, member in zip(study.images, members))
  lines, modalities, input_bytes = [], collections.Counter(), 0
  for path, member, modality, size_bytes in files:
    lines.append(json_line({"path": path, "object": uri,
                            "member": member}) + "\n")
    modalities[modality or "unknown"] += 1
    input_bytes += size_bytes
  name = posixpath.basename(uri).removesuffix(ARCHIVE_SUFFIX)
  write_text_file(join_uri(listing, name + ".json"), "".join(lines))
  fact = {
      "uri": uri, "entity_id": entity, "study_instance_uid": study_uid,
      "instances": len(lines), "input_bytes": input_bytes,
      "size_bytes": size, "md5_hash": md5, "outcome": outcome,
      "modalities": dict(sorted(modalities.items())),
  }
  if isinstance(done, RecordedStudy):
    fact["not_read"] = True
  return "studies", fact


def read_stored_listing(report: Dict[str, Any]) -> List[Dict[str, str]]:
  """Every line of a report's stored listing (local or gs://), by path."""
  entries = []
  for match in FileSystems.match([report["stored_files"]])[0].metadata_list:
    with FileSystems.open(match.path) as f:
      entries.extend(json.loads(line) for line in f.read().decode(
          "utf-8").splitlines() if line)
  return sorted(entries, key=lambda e: e["path"])


def _excluded_entry(e: Excluded) -> Dict[str, Any]:
  entry = {"path": e.path, "entity_id": e.entity_id, "reason": e.reason}
  if e.not_reread_since:   # unchanged since that run: not read again
    entry["not_reread_since"] = e.not_reread_since
  return entry


def build_report(run_id: str, version: str, collection: str,
                 discovered: int, entities: int, excluded: List[Excluded],
                 studies: List[Dict[str, Any]], rows_written: int,
                 dead_letters: int, listing: str, plan: bool = False
                 ) -> Dict[str, Any]:
  """The report: every study with its outcome ('studies'), every file not
  stored with its reason, and the totals. A plan's report has the same
  form, its outcomes what a run would do."""
  by_status = {s: sorted((_excluded_entry(e) for e in excluded
                          if e.status == s), key=lambda d: d["path"])
               for s in (FLAGGED, REJECTED, FAILED)}
  studies = sorted(studies, key=lambda s: s["uri"])
  by_outcome = collections.defaultdict(list)
  for study in studies:
    by_outcome[study["outcome"]].append(study)
  summary = {
      "entities": entities,
      "images_seen": discovered,
      "kept": sum(s["instances"] for s in studies),
      "flagged": len(by_status[FLAGGED]),
      "rejected": len(by_status[REJECTED]),
      "failed": len(by_status[FAILED]),
      "studies": len(studies),
      "input_bytes_kept": sum(s["input_bytes"] for s in studies),
      # Unchanged since earlier runs: not read again (transforms/shortcut.py)
      "studies_not_read": sum(1 for s in studies if s.get("not_read")),
      "files_not_read": sum(s["instances"] for s in studies
                            if s.get("not_read")) + sum(
                                1 for s in (FLAGGED, REJECTED)
                                for e in by_status[s]
                                if e.get("not_reread_since")),
  }
  if plan:
    summary.update({
        "studies_to_write": len(by_outcome[PLANNED[WRITE]]),
        "studies_to_complete_rows": len(by_outcome[PLANNED[COMPLETE_ROWS]]),
        "studies_to_skip": len(by_outcome[PLANNED[SKIP]]),
        "input_bytes_to_write": sum(s["input_bytes"]
                                    for s in by_outcome[PLANNED[WRITE]]),
    })
  else:
    summary.update({
        "studies_skipped": len(by_outcome[SKIPPED]),
        "objects": len(by_outcome[WRITTEN]),
        "object_bytes": sum(s["size_bytes"] for s in by_outcome[WRITTEN]),
        "objects_rows_completed": len(by_outcome[ROWS_COMPLETED]),
        "rows": rows_written,
        "dead_letter_rows": dead_letters,
    })
  return {"run_id": run_id, "pipeline_version": version,
          "collection": collection, "plan": plan, "summary": summary,
          "studies": studies, "objects": by_outcome[WRITTEN],
          "objects_rows_completed": by_outcome[ROWS_COMPLETED],
          "stored_files": join_uri(listing, "*.json"), **by_status}


def report_as_recorded(path: str, run_id: str, version: str, collection: str,
                       seen: int, entities: int, studies: List[RecordedStudy],
                       excluded: List[Excluded], plan: bool = False
                       ) -> Dict[str, Any]:
  """The report of a run whose input is unchanged since earlier runs,
  decided before the run (shortcut.unchanged_input): every study skipped
  as recorded, nothing read, no rows; the same report the graph would
  write to `path` (the caller writes it). Writes its stored listing."""
  listing = stored_listing(path, run_id)
  outcome = PLANNED[SKIP] if plan else SKIPPED
  return build_report(
      run_id, version, collection, seen, entities, excluded,
      [list_study(study, listing, outcome)[1] for study in studies], 0, 0,
      listing, plan)


def format_summary(report: Dict[str, Any]) -> str:
  s = report["summary"]
  if report.get("plan"):
    studies = (
        f"  studies {s['studies']}: {s['studies_to_write']} to write "
        f"({s['input_bytes_to_write']:,} bytes of images), "
        f"{s['studies_to_complete_rows']} to complete rows (object in "
        f"place), {s['studies_to_skip']} to skip (already stored); nothing "
        "was written")
  else:
    studies = (
        f"  studies {s['studies']}: {s['objects']} objects written "
        f"({s['object_bytes']:,} bytes), {s['objects_rows_completed']} "
        f"already in place (rows completed), {s['studies_skipped']} skipped "
        f"(already stored); rows {s['rows']}"
        + (f", dead-letter rows {s['dead_letter_rows']}"
           if s["dead_letter_rows"] else ""))
  took = (f" in {duration(s['seconds'], True)}"
          if s.get("seconds") is not None else "")
  lines = [
      f"{'Plan' if report.get('plan') else 'Run'} {report['run_id']} "
      f"(collection {report['collection']}){took}:",
      f"  entities {s['entities']}, images seen {s['images_seen']}: "
      f"kept {s['kept']}, flagged {s['flagged']}, rejected {s['rejected']}, "
      f"failed {s['failed']}",
      studies,
  ]
  if s.get("files_not_read"):
    lines.append(f"  unchanged since earlier runs, not read again: "
                 f"{s['files_not_read']} files ({s['studies_not_read']} "
                 "studies)")
  for status in (FLAGGED, REJECTED, FAILED):
    for item in report[status][:5]:
      lines.append(f"  {status}: {item['path']}: {item['reason']}")
    if len(report[status]) > 5:
      lines.append(f"  ... {len(report[status]) - 5} more {status} "
                   "(see the report)")
  return "\n".join(lines)


def write_report(path: str, report: Dict[str, Any]) -> None:
  with FileSystems.create(path) as f:
    f.write(json.dumps(report, indent=1, sort_keys=True).encode("utf-8"))


def read_report(path: str) -> Dict[str, Any]:
  with FileSystems.open(path) as f:
    return json.loads(f.read().decode("utf-8"))


class _CollectOutcome(beam.CombineFn):
  """All the report needs, from ("kind", value) facts, in one combine (one
  shuffle, instead of a count or list per kind): counts of seen files, rows
  sent, refused and dead-letter rows; entity ids; excluded files; summaries
  of studies with their outcomes."""
  COUNTED = ("seen", "rows_sent", "refused", "dead_letters")
  LISTED = ("excluded", "studies")

  def create_accumulator(self):
    acc = {k: 0 for k in self.COUNTED}
    acc.update({k: [] for k in self.LISTED})
    acc["entities"] = set()
    return acc

  def add_input(self, acc, fact):
    kind, value = fact
    if kind in self.COUNTED:
      acc[kind] += 1
    elif kind == "entity":
      acc["entities"].add(value)
    elif kind in self.LISTED:
      acc[kind].append(value)
    return acc   # "start": nothing to add

  def merge_accumulators(self, accumulators):
    merged = self.create_accumulator()
    for acc in accumulators:
      for k in self.COUNTED:
        merged[k] += acc[k]
      for k in self.LISTED:
        merged[k].extend(acc[k])
      merged["entities"] |= acc["entities"]
    return merged

  def extract_output(self, acc):
    return acc


def _write_report(keyed_outcome, path, run_id, version, collection, listing,
                  plan):
  outcome = keyed_outcome[1]
  report = build_report(run_id, version, collection, outcome["seen"],
                        len(outcome["entities"]), outcome["excluded"],
                        outcome["studies"],
                        outcome["rows_sent"] - outcome["refused"],
                        outcome["dead_letters"], listing, plan)
  write_report(path, report)
  yield path


def _facts(pcoll, label: str, kind: str, value=lambda v: None):
  return pcoll | label >> beam.Map(lambda v: (kind, value(v)))


class WriteRunReport(beam.PTransform):
  """Collects the run's outcome into one JSON report at `path`, and lists
  the stored files beside it (stored_listing).

  parts: "seen", PCollections with one element per listed file between
  them (counted as they are, not flattened first); "files", those in
  entities; "excluded"; the studies by outcome: "stored" and "skipped"
  (StoredStudy), or in a plan "planned" (PlannedStudy), and "recorded"
  (RecordedStudy: unchanged, not read again); "rows", "refused" and
  "dead_letter", the rows' fates (none in a plan).
  """

  def __init__(self, path: str, run_id: str, version: str, collection: str,
               plan: bool = False):
    super().__init__()
    self.path = path
    self.run_id = run_id
    self.version = version
    self.collection = collection
    self.plan = plan

  def expand(self, parts):
    listing = stored_listing(self.path, self.run_id)
    # Each study listed where it is, not behind a Flatten: the local runner
    # materializes a multi-input Flatten, which would pass every study's
    # members through the driver. Only the small facts are flattened.
    studies = [
        parts[part] | f"List{part.title()}" >> beam.Map(
            list_study, listing, outcome)
        for part, outcome in self._outcomes(parts)]
    facts = [
        # One fact always, so that a run with no input still has a report.
        parts["files"].pipeline | "Start" >> Once([("start", None)]),
        *[_facts(listed, f"Seen{i}", "seen")
          for i, listed in enumerate(parts["seen"])],
        _facts(parts["files"], "Entities", "entity", lambda f: f.entity_id),
        _facts(parts["excluded"], "Excluded", "excluded", lambda e: e),
        *studies,
        *[_facts(parts[part], label, kind) for part, label, kind in (
            ("rows", "RowsSent", "rows_sent"), ("refused", "Refused", "refused"),
            ("dead_letter", "DeadLetters", "dead_letters")) if part in parts],
    ]
    return (facts
            | "AllFacts" >> beam.Flatten()
            | "OneKey" >> beam.Map(lambda fact: (None, fact))
            | "Collect" >> beam.CombinePerKey(_CollectOutcome())
            | "Write" >> beam.FlatMap(_write_report, self.path, self.run_id,
                                      self.version, self.collection, listing,
                                      self.plan))

  def _outcomes(self, parts):
    """(part, outcome) of each part holding studies."""
    found = ([("planned", None)] if "planned" in parts
             else [("stored", None), ("skipped", SKIPPED)])
    if "recorded" in parts:   # skipped without being read again
      found.append(("recorded", PLANNED[SKIP] if self.plan else SKIPPED))
    return found
