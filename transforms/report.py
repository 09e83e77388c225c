"""The run report: every input file accounted for, and the totals.

It is assembled inside the pipeline from the excluded files, the stored
studies and the row counts, and written once as JSON. The driver prints
its summary when the run ends.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from transforms.records import (FAILED, FLAGGED, REJECTED, Excluded,
                                StoredStudy)


def study_summary(stored: StoredStudy) -> Dict[str, Any]:
  """What the report keeps of a stored study: small, no headers. The
  'objects' list holds studies written in this run; skipped ones (already
  stored) count among 'studies' and their files among 'stored'."""
  return {
      "uri": stored.location.uri,
      "entity_id": stored.study.entity_id,
      "study_instance_uid": stored.study.study_instance_uid,
      "instances": len(stored.members),
      "size_bytes": stored.location.size_bytes,
      "md5_hash": stored.location.md5_hash,
      "files": [{"path": i.source.path, "member": m.member}
                for i, m in zip(stored.study.images, stored.members)],
  }


def build_report(run_id: str, version: str, collection: str,
                 discovered: int, entities: int, excluded: List[Excluded],
                 studies: List[Dict[str, Any]], skipped: List[Dict[str, Any]],
                 rows_written: int, dead_letters: int) -> Dict[str, Any]:
  by_status = {s: sorted(({"path": e.path, "entity_id": e.entity_id,
                           "reason": e.reason} for e in excluded
                          if e.status == s), key=lambda d: d["path"])
               for s in (FLAGGED, REJECTED, FAILED)}
  studies = sorted(studies, key=lambda s: s["uri"])
  stored_files = sorted(
      ({"path": f["path"], "object": s["uri"], "member": f["member"]}
       for s in studies + skipped for f in s["files"]),
      key=lambda d: d["path"])
  objects = [{k: s[k] for k in ("uri", "entity_id", "study_instance_uid",
                                "instances", "size_bytes", "md5_hash")}
             for s in studies]
  summary = {
      "entities": entities,
      "images_seen": discovered,
      "kept": len(stored_files),
      "flagged": len(by_status[FLAGGED]),
      "rejected": len(by_status[REJECTED]),
      "failed": len(by_status[FAILED]),
      "studies": len(studies) + len(skipped),
      "studies_skipped": len(skipped),
      "objects": len(objects),
      "object_bytes": sum(o["size_bytes"] for o in objects),
      "rows": rows_written,
      "dead_letter_rows": dead_letters,
  }
  return {"run_id": run_id, "pipeline_version": version,
          "collection": collection, "summary": summary, "objects": objects,
          "stored": stored_files, **by_status}


def format_summary(report: Dict[str, Any]) -> str:
  s = report["summary"]
  lines = [
      f"Run {report['run_id']} (collection {report['collection']}):",
      f"  entities {s['entities']}, images seen {s['images_seen']}: "
      f"kept {s['kept']}, flagged {s['flagged']}, rejected {s['rejected']}, "
      f"failed {s['failed']}",
      f"  studies {s['studies']} ({s['studies_skipped']} skipped: already "
      f"stored), objects written {s['objects']}, "
      f"{s['object_bytes']:,} bytes; rows {s['rows']}"
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


def read_report(path: str) -> Dict[str, Any]:
  with FileSystems.open(path) as f:
    return json.loads(f.read().decode("utf-8"))


def _write_report(_, path, run_id, version, collection, discovered, entities,
                  excluded, studies, skipped, rows_sent, refused, dead_letters):
  report = build_report(run_id, version, collection, discovered, entities,
                        excluded, studies, skipped, rows_sent - refused,
                        dead_letters)
  with FileSystems.create(path) as f:
    f.write(json.dumps(report, indent=1, sort_keys=True).encode("utf-8"))
  yield path


def _count(pcoll, label):
  return pcoll | label >> beam.combiners.Count.Globally()


class WriteRunReport(beam.PTransform):
  """Collects the run's outcome into one JSON report at `path`."""

  def __init__(self, path: str, run_id: str, version: str, collection: str):
    super().__init__()
    self.path = path
    self.run_id = run_id
    self.version = version
    self.collection = collection

  def expand(self, parts: Dict[str, Any]):
    # "seen" holds the path of every listed file, "files" those in entities.
    seen, files, excluded = parts["seen"], parts["files"], parts["excluded"]
    stored, rows, dead = parts["stored"], parts["rows"], parts["dead_letter"]
    skipped, refused = parts["skipped"], parts["refused"]
    side = beam.pvalue.AsSingleton
    return (
        files.pipeline
        | "Once" >> beam.Create([None])
        | "Write" >> beam.FlatMap(
            _write_report, self.path, self.run_id, self.version,
            self.collection,
            discovered=side(_count(seen, "CountSeen")),
            entities=side(files
                          | "EntityIds" >> beam.Map(lambda f: f.entity_id)
                          | "DistinctEntities" >> beam.Distinct()
                          | "CountEntities" >> beam.combiners.Count.Globally()),
            excluded=side(excluded | "ListExcluded" >> beam.combiners.ToList()),
            studies=side(stored
                         | "Summaries" >> beam.Map(study_summary)
                         | "ListStudies" >> beam.combiners.ToList()),
            skipped=side(skipped
                         | "SkippedSummaries" >> beam.Map(study_summary)
                         | "ListSkipped" >> beam.combiners.ToList()),
            rows_sent=side(_count(rows, "CountRows")),
            refused=side(_count(refused, "CountRefused")),
            dead_letters=side(_count(dead, "CountDeadLetters"))))
