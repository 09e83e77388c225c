"""The run report: every input file accounted for, and the totals.

It is assembled inside the pipeline from the excluded files, the stored
studies and the row counts, and written once as JSON. The driver prints
its summary when the run ends. Stored files, most of a run's files, are
listed apart, in JSON-lines files beside the report written as studies
are stored (stored_listing): the report itself, and the memory that
builds it, grow with the run's studies and bad files, not its images.
"""

import json
import posixpath
from typing import Any, Dict, Iterable, List

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from transforms.keys import ARCHIVE_SUFFIX, join_uri
from transforms.records import (FAILED, FLAGGED, REJECTED, Excluded,
                                StoredStudy)
from transforms.sinks import json_line, write_text_file

STORED_PREFIX = "stored-"


def study_summary(stored: StoredStudy) -> Dict[str, Any]:
  """What the report keeps of a stored study: small, no headers, nothing per
  image. The 'objects' list holds objects written in this run,
  'objects_rows_completed' objects already in place whose rows this run
  wrote; skipped ones (already stored, with current rows) count among
  'studies' and their files among the stored."""
  return {
      "uri": stored.location.uri,
      "entity_id": stored.study.entity_id,
      "study_instance_uid": stored.study.study_instance_uid,
      "instances": len(stored.members),
      "size_bytes": stored.location.size_bytes,
      "md5_hash": stored.location.md5_hash,
      "rows_completed": stored.rows_completed,
  }


def stored_files(stored: StoredStudy) -> Iterable[Dict[str, str]]:
  """One line of the stored listing per image of a stored (or skipped)
  study: its input path, its study object and its member there."""
  for image, member in zip(stored.study.images, stored.members):
    yield {"path": image.source.path, "object": stored.location.uri,
           "member": member.member}


def stored_listing(report_path: str, run_id: str) -> str:
  """The stored listing's folder, beside the report."""
  return join_uri(posixpath.dirname(report_path), STORED_PREFIX + run_id)


def write_stored_files(stored: StoredStudy, listing: str) -> str:
  """The study's lines of the stored listing, one file per study object,
  named after it: written whole, so a retried bundle rewrites the same file
  (no temporary files to rename, which Cloud Storage does by copying)."""
  name = posixpath.basename(stored.location.uri).removesuffix(ARCHIVE_SUFFIX)
  path = join_uri(listing, name + ".json")
  write_text_file(path, "".join(json_line(line) + "\n"
                                for line in stored_files(stored)))
  return path


def read_stored_listing(report: Dict[str, Any]) -> List[Dict[str, str]]:
  """Every line of a report's stored listing (local or gs://), by path."""
  entries = []
  for match in FileSystems.match([report["stored_files"]])[0].metadata_list:
    with FileSystems.open(match.path) as f:
      entries.extend(json.loads(line) for line in f.read().decode(
          "utf-8").splitlines() if line)
  return sorted(entries, key=lambda e: e["path"])


def build_report(run_id: str, version: str, collection: str,
                 discovered: int, entities: int, excluded: List[Excluded],
                 studies: List[Dict[str, Any]], skipped: List[Dict[str, Any]],
                 rows_written: int, dead_letters: int, listing: str
                 ) -> Dict[str, Any]:
  by_status = {s: sorted(({"path": e.path, "entity_id": e.entity_id,
                           "reason": e.reason} for e in excluded
                          if e.status == s), key=lambda d: d["path"])
               for s in (FLAGGED, REJECTED, FAILED)}
  objects = sorted((s for s in studies if not s["rows_completed"]),
                   key=lambda s: s["uri"])
  completed = sorted((s for s in studies if s["rows_completed"]),
                     key=lambda s: s["uri"])
  summary = {
      "entities": entities,
      "images_seen": discovered,
      "kept": sum(s["instances"] for s in studies + skipped),
      "flagged": len(by_status[FLAGGED]),
      "rejected": len(by_status[REJECTED]),
      "failed": len(by_status[FAILED]),
      "studies": len(studies) + len(skipped),
      "studies_skipped": len(skipped),
      "objects": len(objects),
      "object_bytes": sum(o["size_bytes"] for o in objects),
      "objects_rows_completed": len(completed),
      "rows": rows_written,
      "dead_letter_rows": dead_letters,
  }
  return {"run_id": run_id, "pipeline_version": version,
          "collection": collection, "summary": summary, "objects": objects,
          "objects_rows_completed": completed,
          "stored_files": join_uri(listing, "*.json"), **by_status}


def format_summary(report: Dict[str, Any]) -> str:
  s = report["summary"]
  lines = [
      f"Run {report['run_id']} (collection {report['collection']}):",
      f"  entities {s['entities']}, images seen {s['images_seen']}: "
      f"kept {s['kept']}, flagged {s['flagged']}, rejected {s['rejected']}, "
      f"failed {s['failed']}",
      f"  studies {s['studies']}: {s['objects']} objects written "
      f"({s['object_bytes']:,} bytes), {s['objects_rows_completed']} already "
      f"in place (rows completed), {s['studies_skipped']} skipped (already "
      f"stored); rows {s['rows']}"
      + (f", dead-letter rows {s['dead_letter_rows']}"
         if s["dead_letter_rows"] else ""),
  ]
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
  of stored and skipped studies."""
  COUNTED = ("seen", "rows_sent", "refused", "dead_letters")
  LISTED = ("excluded", "studies", "skipped")

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


def _write_report(keyed_outcome, path, run_id, version, collection, listing):
  outcome = keyed_outcome[1]
  report = build_report(run_id, version, collection, outcome["seen"],
                        len(outcome["entities"]), outcome["excluded"],
                        outcome["studies"], outcome["skipped"],
                        outcome["rows_sent"] - outcome["refused"],
                        outcome["dead_letters"], listing)
  write_report(path, report)
  yield path


def _facts(pcoll, label: str, kind: str, value=lambda v: None):
  return pcoll | label >> beam.Map(lambda v: (kind, value(v)))


class WriteRunReport(beam.PTransform):
  """Collects the run's outcome into one JSON report at `path`, and lists
  the stored files beside it (stored_listing)."""

  def __init__(self, path: str, run_id: str, version: str, collection: str):
    super().__init__()
    self.path = path
    self.run_id = run_id
    self.version = version
    self.collection = collection

  def expand(self, parts):
    # "seen": PCollections with one element per listed file between them
    # (counted as they are, not flattened first); "files": those in entities.
    facts = [
        # One fact always, so that a run with no input still has a report.
        parts["files"].pipeline | "Start" >> beam.Create([("start", None)]),
        *[_facts(listed, f"Seen{i}", "seen")
          for i, listed in enumerate(parts["seen"])],
        _facts(parts["files"], "Entities", "entity", lambda f: f.entity_id),
        _facts(parts["excluded"], "Excluded", "excluded", lambda e: e),
        _facts(parts["stored"], "Studies", "studies", study_summary),
        _facts(parts["skipped"], "Skipped", "skipped", study_summary),
        _facts(parts["rows"], "RowsSent", "rows_sent"),
        _facts(parts["refused"], "Refused", "refused"),
        _facts(parts["dead_letter"], "DeadLetters", "dead_letters"),
    ]
    # Each where its studies are, not behind a Flatten: the local runner
    # materializes a multi-input Flatten, which would pass every study's
    # members through the driver.
    listing = stored_listing(self.path, self.run_id)
    for part in ("stored", "skipped"):
      _ = parts[part] | f"List{part.title()}Files" >> beam.Map(
          write_stored_files, listing)
    return (facts
            | "AllFacts" >> beam.Flatten()
            | "OneKey" >> beam.Map(lambda fact: (None, fact))
            | "Collect" >> beam.CombinePerKey(_CollectOutcome())
            | "Write" >> beam.FlatMap(_write_report, self.path, self.run_id,
                                      self.version, self.collection, listing))
