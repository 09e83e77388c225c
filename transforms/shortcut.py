"""A scheduled run costs what changed: an entity folder whose files are all
as earlier runs recorded them is not read again.

Each file's listing facts (its path below the entity, size, and version:
modification time in nanoseconds on a local disk, generation on Cloud
Storage) are recorded where its outcome is:

- a stored file's, in its row (source_path, storage.member_size_bytes,
  source_version, rules): they reach this step with the current rows, which
  every run reads anyway to decide what is already stored;
- a flagged or rejected file's, in the excluded ledger: one JSON-lines file
  per run, <bucket>/Runs/<collection>/excluded-<run id>.json, every file
  the run flagged or rejected (read or not) with its facts and reason; the
  newest one is read back.

The listed files, the current rows and the ledger's entries meet per
entity (a CoGroupByKey by entity id; studies never span entities). An
entity is unchanged when its files are exactly the recorded ones (none
added, none gone), each with the recorded size and version, all recorded
under the same rules as this run's (PHI rules, deid recipe, item id,
pipeline version: transforms/options rules_fingerprint). Its studies are
then skipped as their current rows describe them (RecordedStudy), and its
flagged and rejected files keep their recorded outcome, marked as not read
again. An entity with any change is read whole and handled as a full run
handles it: correctness first, the shortcut only where nothing changed.
"""

import json
import random
from typing import (Any, Dict, Iterable, Iterator, List, NamedTuple, Optional,
                    Tuple, Union)

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from transforms.current import CurrentRow
from transforms.keys import join_uri
from transforms.once import Once
from transforms.progress import Count
from transforms.records import (FLAGGED, REJECTED, Excluded, RecordedStudy,
                                SourceFile)
from transforms.sinks import json_line, write_text_file

LEDGER_PREFIX = "excluded-"
SKIPPED_TAG = "skipped"
EXCLUDED_TAG = "excluded"
FILES_PER_BATCH = 64


class LedgerEntry(NamedTuple):
  """A flagged or rejected file, as a run recorded it."""
  entity_id: str
  relpath: str
  size_bytes: int
  version: str
  rules: str
  status: str
  reason: str
  run_id: str


def ledger_folder(bucket: str, collection: str) -> str:
  return join_uri(bucket, f"Runs/{collection}")


def ledger_path(bucket: str, collection: str, run_id: str) -> str:
  return join_uri(ledger_folder(bucket, collection),
                  f"{LEDGER_PREFIX}{run_id}.json")


def newest_ledger(bucket: str, collection: str) -> Optional[str]:
  """The newest run's ledger (run ids sort by time), or None."""
  pattern = join_uri(ledger_folder(bucket, collection),
                     LEDGER_PREFIX + "*.json")
  try:
    found = FileSystems.match([pattern])[0].metadata_list
  except Exception:  # pylint: disable=broad-except
    return None   # no Runs/ folder yet
  return max((m.path for m in found), default=None)


def read_ledger(path: str) -> Iterable[LedgerEntry]:
  with FileSystems.open(path) as f:
    for line in f:
      if line.strip():
        yield LedgerEntry(**json.loads(line))


class _ReadLedger(beam.DoFn):
  def process(self, location: Tuple[str, str]) -> Iterable[LedgerEntry]:
    path = newest_ledger(*location)
    if path:
      yield from read_ledger(path)


def _compact(source: SourceFile) -> Tuple[str, str, int, str]:
  return source.path, source.relpath, source.size_bytes, source.version


def unchanged(listed: List[Tuple[str, str, int, str]],
              current: List[CurrentRow], ledger: List[LedgerEntry],
              rules: str) -> bool:
  """Whether an entity's listed files are exactly the recorded ones, each
  with its recorded size and version, all recorded under these rules."""
  recorded: Dict[str, Tuple[int, Optional[str], Optional[str]]] = {}
  for row in current:
    recorded[row.source_path] = (row.member_size_bytes, row.source_version,
                                 row.rules)
  for entry in ledger:
    if entry.relpath in recorded:
      return False   # stored and excluded at once: look again
    recorded[entry.relpath] = (entry.size_bytes, entry.version, entry.rules)
  if len(listed) != len(recorded) or not recorded:
    return False
  for _, relpath, size, version in listed:
    facts = recorded.get(relpath)
    if facts is None or facts != (size, version, rules) or not version:
      return False
  return True


def recorded_studies(entity: str, path_of: Dict[str, str],
                     current: List[CurrentRow]) -> List[RecordedStudy]:
  """The entity's studies as their current rows describe them; path_of:
  each listed file's path by its path below the entity."""
  studies: Dict[str, List[CurrentRow]] = {}
  for row in current:
    studies.setdefault(row.study_instance_uid, []).append(row)
  return [RecordedStudy(
      entity, uid, rows[0].uri, rows[0].size_bytes, rows[0].md5_hash,
      tuple(sorted((path_of[r.source_path], r.member, r.sop_instance_uid,
                    r.modality, r.member_size_bytes) for r in rows)))
          for uid, rows in sorted(studies.items())]


def as_recorded(entity: str, listed: List[Tuple[str, str, int, str]],
                current: List[CurrentRow], ledger: List[LedgerEntry]
                ) -> Iterator[Union[RecordedStudy, Excluded]]:
  """An unchanged entity as earlier runs recorded it: its studies as their
  current rows describe them, its flagged and rejected files with their
  recorded outcome, marked as not read again."""
  path_of = {relpath: path for path, relpath, _, _ in listed}
  yield from recorded_studies(entity, path_of, current)
  for entry in ledger:
    yield Excluded(path_of[entry.relpath], entity, entry.status, entry.reason,
                   not_reread_since=entry.run_id)


def even_batches(items: List[Any], most: int) -> Iterator[List[Any]]:
  """items in as few batches of at most `most` as possible, of equal sizes
  (to one). The local runner deals a stage's input to its workers in turn,
  batch by batch: batches of 64 then 36 per entity of 100 files gave one
  worker every 64 and the other every 36, and left it idle for a third of
  the stage."""
  count = -(-len(items) // most)
  for i in range(count):
    yield items[i * len(items) // count:(i + 1) * len(items) // count]


class _Decide(beam.DoFn):
  """Per entity: its studies skipped and its bad files' outcomes kept when
  nothing changed, else its files to read, in batches."""

  def __init__(self, rules: str):
    self.rules = rules
    self.not_read = Count("images_not_read")
    self.flagged = Count("files_flagged")
    self.rejected = Count("files_rejected")

  def process(self, grouped) -> Iterable[Any]:
    entity, parts = grouped
    # Entities recorded but not in this run's input give nothing.
    listed = sorted(set(parts["files"]))
    current, ledger = list(parts["current"]), list(parts["ledger"])
    if listed and unchanged(listed, current, ledger, self.rules):
      for recorded in as_recorded(entity, listed, current, ledger):
        if isinstance(recorded, RecordedStudy):
          self.not_read.inc(len(recorded.files))
          yield beam.pvalue.TaggedOutput(SKIPPED_TAG, recorded)
        else:
          (self.flagged if recorded.status == FLAGGED else self.rejected).inc()
          yield beam.pvalue.TaggedOutput(EXCLUDED_TAG, recorded)
    else:
      for batch in even_batches(listed, FILES_PER_BATCH):
        yield random.getrandbits(32), json.dumps([entity, batch])


# Up to this many listed files, a local run decides in its driver whether
# its whole input is unchanged (pipeline/run.py input_as_recorded): ~1 s of
# listing and ~260 MB of current rows held at most, against the ~2 s its
# worker processes take to start. A larger input is decided by the graph.
DRIVER_DECISION_FILES = 200_000


class AsRecorded(NamedTuple):
  """A run's whole input unchanged since earlier runs, decided before the
  run: what its report and its ledger say."""
  seen: int                    # files listed
  entities: int
  studies: List[RecordedStudy]
  excluded: List[Excluded]     # recorded outcomes, and files rejected by name
  ledger: List[LedgerEntry]    # carried over as they are


def unchanged_input(listed: Iterable[Union[SourceFile, Excluded]],
                    current: Iterable[CurrentRow],
                    ledger: Iterable[LedgerEntry], rules: str
                    ) -> Optional[AsRecorded]:
  """The whole input as recorded, when every entity listed is unchanged
  (the same test EntityShortcut makes per entity); None as soon as one is
  not, or when nothing is listed: the run then goes through the graph."""
  files: Dict[str, set] = {}
  seen, excluded = 0, []
  for found in listed:
    seen += 1
    if isinstance(found, SourceFile):
      files.setdefault(found.entity_id, set()).add(_compact(found))
    else:   # rejected by its name: not recorded, decided again every run
      excluded.append(found)
  if not files:
    return None
  rows: Dict[str, List[CurrentRow]] = {}
  for row in current:
    rows.setdefault(row.entity_id, []).append(row)
  entries: Dict[str, List[LedgerEntry]] = {}
  for entry in ledger:
    entries.setdefault(entry.entity_id, []).append(entry)
  studies, kept = [], []
  for entity, entity_files in sorted(files.items()):
    entity_listed = sorted(entity_files)
    entity_rows, entity_entries = rows.get(entity, []), entries.get(entity, [])
    if not unchanged(entity_listed, entity_rows, entity_entries, rules):
      return None
    for recorded in as_recorded(entity, entity_listed, entity_rows,
                                entity_entries):
      (studies if isinstance(recorded, RecordedStudy) else excluded).append(
          recorded)
    kept += entity_entries
  return AsRecorded(seen, len(files), studies, excluded, kept)


def _unbatch(keyed_batch) -> Iterable[SourceFile]:
  entity, files = json.loads(keyed_batch[1])
  for path, relpath, size, version in files:
    yield SourceFile(path, entity, relpath, size, version)


class EntityShortcut(beam.PTransform):
  """{'files': listed SourceFiles, 'current': CurrentRows, 'ledger':
  LedgerEntries} -> {'to_read': SourceFiles of changed entities,
  'skipped': RecordedStudy, 'excluded': Excluded kept from the ledger}."""

  def __init__(self, rules: str):
    super().__init__()
    self.rules = rules

  def expand(self, inputs):
    keyed = {
        "files": inputs["files"] | "FilesByEntity" >> beam.Map(
            lambda f: (f.entity_id, _compact(f))),
        "current": inputs["current"] | "RowsByEntity" >> beam.Map(
            lambda r: (r.entity_id, r)),
        "ledger": inputs["ledger"] | "LedgerByEntity" >> beam.Map(
            lambda e: (e.entity_id, e)),
    }
    decided = (keyed
               | "ByEntity" >> beam.CoGroupByKey()
               | "Decide" >> beam.ParDo(_Decide(self.rules)).with_outputs(
                   SKIPPED_TAG, EXCLUDED_TAG, main="batches"))
    # The files of one changed entity come from one worker: spread them.
    to_read = (decided.batches
               | "Spread" >> beam.Reshuffle()
               | "Unbatch" >> beam.FlatMap(_unbatch))
    return {"to_read": to_read, SKIPPED_TAG: decided[SKIPPED_TAG],
            EXCLUDED_TAG: decided[EXCLUDED_TAG]}


class ReadExcludedLedger(beam.PTransform):
  """-> the LedgerEntries of the newest run's ledger (none without one)."""

  def __init__(self, bucket: str, collection: str):
    super().__init__()
    self.bucket = bucket
    self.collection = collection

  def expand(self, pbegin):
    return (pbegin
            | "Where" >> Once([(self.bucket, self.collection)])
            | "Read" >> beam.ParDo(_ReadLedger()))


def _ledger_entry(source: SourceFile, excluded: Dict[str, Excluded],
                  rules: str, run_id: str) -> Iterable[Dict[str, Any]]:
  found = excluded.get(source.path)
  if found is not None:
    yield LedgerEntry(source.entity_id, source.relpath, source.size_bytes,
                      source.version, rules, found.status, found.reason,
                      found.not_reread_since or run_id)._asdict()


def write_ledger(path: str, entries: Iterable[Dict[str, Any]]) -> None:
  """The whole ledger, written even when empty: the newest ledger must be
  this run's, or an older one's entries would be read back."""
  write_text_file(path, "".join(sorted(json_line(e) + "\n" for e in entries)))


def _write_ledger(keyed_entries, path: str) -> Iterable[str]:
  write_ledger(path, (e for e in keyed_entries[1] if e is not None))
  yield path


class WriteExcludedLedger(beam.PTransform):
  """{'files': listed SourceFiles, 'excluded': Excluded} -> this run's
  ledger: every flagged or rejected listed file, with the facts it was
  listed with (failed files are not recorded: they are tried again)."""

  def __init__(self, path: str, rules: str, run_id: str):
    super().__init__()
    self.path = path
    self.rules = rules
    self.run_id = run_id

  def expand(self, inputs):
    by_path = (inputs["excluded"]
               | "FlaggedOrRejected" >> beam.Filter(
                   lambda e: e.status in (FLAGGED, REJECTED))
               | "ByPath" >> beam.Map(lambda e: (e.path, e)))
    entries = inputs["files"] | "Entries" >> beam.FlatMap(
        _ledger_entry, beam.pvalue.AsDict(by_path), self.rules, self.run_id)
    always = entries.pipeline | "Always" >> Once([None])
    return ((entries, always)
            | "WithStart" >> beam.Flatten()
            | "OneKey" >> beam.Map(lambda e: (None, e))
            | "Collect" >> beam.GroupByKey()
            | "Write" >> beam.FlatMap(_write_ledger, self.path))

