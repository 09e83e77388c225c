"""Build and run the graph: discover -> flag PHI -> read headers -> flag PHI
-> group by study -> write study archive -> build rows -> sink rows; report.
"""

import contextlib
import datetime
import itertools
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Iterator, List, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (DirectOptions,
                                                  GoogleCloudOptions,
                                                  PipelineOptions,
                                                  StandardOptions, TestOptions)
from apache_beam.portability import python_urns
from apache_beam.portability.api import beam_provision_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.portability.portable_runner import JobServiceHandle

from pipeline import __version__, beam_tuning
from pipeline.console import (Console, StorageProgress, live_progress,
                              run_log)
from pipeline.local_workers import (WarmWorkers, default_worker_count,
                                    return_large_buffers_to_the_os,
                                    small_local_input, take_warm_workers)
from pipeline.options import (OptionsError, RunConfig, StorageOptions,
                              check_arguments, help_text, resolve,
                              verbose_requested)
from transforms import report_html
from transforms.access import AccessError, check_cloud_access, explain_forbidden
from transforms.archive import PlanStudyArchive, WriteStudyArchive
from transforms.bigquery import (IncompatibleTable,
                                 ensure_dataset_and_view, table_exists)
from transforms.bigquery_emulator import (use_emulator_if_configured,
                                          worker_plugin_args)
from transforms.current import ReadCurrentRows, by_study, current_rows
from transforms.dicom import ReadHeaders
from transforms.gcs import blob_for, split_gs_uri, storage_client
from transforms.discover import (DiscoverEntityFiles, InputError,
                                 check_input_roots, list_input,
                                 listing_patterns)
from transforms.keys import join_uri
from transforms.lease import CollectionBusy, Lease
from transforms.once import Once
from transforms.phi import FlagPhiByHeader, FlagPhiByPath
from transforms.progress import PROGRESS_DIR_ENV, read_progress
from transforms.report import (WriteRunReport, format_summary, read_report,
                               report_as_recorded, write_report)
from transforms.rows import BuildRows
from transforms.shortcut import (DRIVER_DECISION_FILES, AsRecorded,
                                 EntityShortcut, ReadExcludedLedger,
                                 WriteExcludedLedger, ledger_path,
                                 newest_ledger, read_ledger, unchanged_input,
                                 write_ledger)
from transforms.sinks import (CheckRows, WriteDeadLetters, WriteRowsBigQuery,
                              WriteRowsLocal, write_text_file)
from transforms.studies import GroupStudies

EXCLUDED = "excluded"


def new_run_id() -> str:
  now = datetime.datetime.now(datetime.timezone.utc)
  return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def local_runner(options: PipelineOptions, argv: List[str]):
  """The runner for a DirectRunner run, using every core by default.

  Beam's DirectRunner first tries to download the Prism runner binary, which
  fails offline and then falls back to the FnApiRunner for a batch pipeline
  like this one; we build that FnApiRunner directly, the way the DirectRunner
  does, with its worker processes forked from a warm process
  (pipeline/local_workers.py). Other runners (Dataflow ...) are left to
  Beam: returns None.
  """
  if options.view_as(StandardOptions).runner not in (None, "DirectRunner"):
    return None
  beam_tuning.apply()
  direct = options.view_as(DirectOptions)
  chosen = {a.split("=")[0] for a in argv}
  if not {"--direct_num_workers", "--direct_running_mode"} & chosen and (
      small_local_input(argv)):
    # A handful of files: in this process, no worker processes to start.
    workers, mode = 1, "in_memory"
  else:
    workers, mode = default_worker_count(), "multi_processing"
  if "--direct_num_workers" not in chosen:
    direct.direct_num_workers = workers
  if "--direct_running_mode" not in chosen:
    direct.direct_running_mode = mode
  return_large_buffers_to_the_os()
  encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
  provision_info = fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
  if direct.direct_running_mode != "multi_processing":
    return fn_runner.FnApiRunner(provision_info=provision_info)
  return _WarmWorkerRunner(
      take_warm_workers(direct.direct_num_workers or default_worker_count()),
      provision_info=provision_info)


class _WarmWorkerRunner(fn_runner.FnApiRunner):
  """Beam's FnApiRunner whose worker processes are forked from a warm
  process (pipeline/local_workers.py) instead of each importing Beam."""

  def __init__(self, warm: WarmWorkers, **kwargs):
    super().__init__(**kwargs)
    self._warm = warm

  def run_via_runner_api(self, pipeline_proto, options):
    for environment in pipeline_proto.components.environments.values():
      if environment.urn == python_urns.SUBPROCESS_SDK:
        environment.payload = self._warm.attach_command().encode()
    try:
      return super().run_via_runner_api(pipeline_proto, options)
    finally:
      self.stop_workers()

  def stop_workers(self) -> None:
    self._warm.stop()


def check_destination(bucket: str, run_id: str) -> None:
  """Fails fast when the bucket cannot take an object (a probe is written
  and deleted, outside the key schema)."""
  probe = join_uri(bucket, f".write-probe-{run_id}")
  try:
    if bucket.startswith("gs://"):
      blob = blob_for(storage_client(), probe)
      blob.upload_from_string(b"probe")
      blob.delete()
    else:
      with FileSystems.create(probe) as f:
        f.write(b"probe")
      FileSystems.delete([probe])
  except Exception as e:  # pylint: disable=broad-except
    raise _bucket_error(bucket, "is not writable", e) from e


def check_readable(bucket: str, collection: str) -> None:
  """Fails fast when the bucket's objects cannot be listed (a plan reads
  them, and writes nothing)."""
  try:
    if bucket.startswith("gs://"):
      name, prefix = split_gs_uri(join_uri(bucket, f"Collection/{collection}/"))
      list(storage_client().list_blobs(name, prefix=prefix, max_results=1))
    elif os.path.exists(bucket) and not os.path.isdir(bucket):
      raise OSError("not a folder")
  except Exception as e:  # pylint: disable=broad-except
    raise _bucket_error(bucket, "cannot be read", e) from e


def _bucket_error(bucket: str, what: str, e: Exception) -> OptionsError:
  """One line: the bucket, what it cannot do, and the fix when Cloud
  Storage refused."""
  if not bucket.startswith("gs://"):
    return OptionsError(f"--bucket {bucket!r} {what}: {e}")
  return OptionsError(f"--bucket {bucket!r} {what}: "
                      + explain_forbidden(e, bucket=split_gs_uri(bucket)[0]))


def check_targets(config: RunConfig, run_id: str) -> bool:
  """Before any work: credentials, the bucket (writable; readable for a
  plan) and the BigQuery table (created with its view when missing; a plan
  creates nothing). Raises OptionsError saying what is wrong. Returns
  whether there are current rows to read (not when a plan's table does not
  exist yet)."""
  try:
    check_cloud_access(config.bucket, config.bigquery_table)
  except AccessError as e:
    raise OptionsError(str(e)) from e
  if config.plan:
    check_readable(config.bucket, config.collection)
  else:
    check_destination(config.bucket, run_id)
  if not config.bigquery_table:
    return True
  try:
    if config.plan:
      return table_exists(config.bigquery_table)
    ensure_dataset_and_view(config.bigquery_table)
    return True
  except IncompatibleTable as e:
    raise OptionsError(str(e)) from e
  except Exception as e:  # pylint: disable=broad-except
    raise OptionsError(
        f"BigQuery {config.bigquery_table} is not reachable: "
        f"{explain_forbidden(e, table=config.bigquery_table)}") from e


def skips_unchanged(config: RunConfig, has_current: bool) -> bool:
  """Whether entities unchanged since earlier runs may go unread: not with
  --overwrite or --full_scan, nor without current rows to compare with."""
  return has_current and not (config.overwrite or config.full_scan)


def build(p: beam.Pipeline, config: RunConfig, run_id: str,
          spill_dir: Optional[str] = None, read_current: bool = True
          ) -> None:
  """The graph, in the order the product is described. spill_dir: a local
  run's own folder, where images wait while they are grouped. read_current:
  False when there are no current rows to read (a plan for a table that
  does not exist yet). A plan (config.plan) stops where writing would
  begin: each study is decided, and only the report is written."""
  found = p | "Discover" >> DiscoverEntityFiles(config.input_roots,
                                               config.entities)
  current = p | "ReadCurrentRows" >> ReadCurrentRows(
      config.bigquery_table, config.metadata_output,
      config.overwrite or not read_current)
  report = {"seen": (found.files, found[EXCLUDED]), "files": found.files}
  to_read, excluded = found.files, [found[EXCLUDED]]
  if skips_unchanged(config, read_current):
    # Entities unchanged since earlier runs are not read again.
    ledger = p | "ReadExcludedLedger" >> ReadExcludedLedger(
        config.bucket, config.collection)
    shortcut = {"files": found.files, "current": current,
                "ledger": ledger} | "EntityShortcut" >> EntityShortcut(
                    config.rules_id)
    to_read = shortcut["to_read"]
    excluded.append(shortcut[EXCLUDED])
    report["recorded"] = shortcut["skipped"]
  path_checked = to_read | "FlagPhiByPath" >> FlagPhiByPath(
      config.phi_rules)
  remote = any(r.startswith("gs://") for r in config.input_roots)
  # A local run sets the records aside on its own disk: no need to deflate.
  spills = bool(spill_dir)
  read = path_checked.kept | "ReadHeaders" >> ReadHeaders(
      remote, config.item_id, deflate_header=not spills)
  header_checked = read.images | "FlagPhiByHeader" >> FlagPhiByHeader(
      config.phi_rules, config.deid_recipe_text)
  # Flagged files' own headers, so that no other copy of them is stored.
  flagged_images = (
      (path_checked.flagged | "ReadFlaggedHeaders" >> ReadHeaders(
          remote, config.item_id, deflate_header=not spills)).images,
      header_checked.flagged) | "AllFlagged" >> beam.Flatten()
  # A local run's images wait in local files (transforms/spill.py).
  grouped = {"images": header_checked.kept, "flagged": flagged_images,
             "current": current | "CurrentByStudy" >> beam.Map(by_study)
             } | "GroupStudies" >> GroupStudies(config.collection, spill_dir)
  excluded += [path_checked[EXCLUDED], read[EXCLUDED],
               header_checked[EXCLUDED], grouped[EXCLUDED]]

  if config.plan:
    planned = grouped["studies"] | "PlanStudyArchive" >> PlanStudyArchive(
        config.bucket, config.overwrite)
    report.update(planned=planned.planned, excluded=[
        *excluded, planned[EXCLUDED]] | "AllExcluded" >> beam.Flatten())
  else:
    written = grouped["studies"] | "WriteStudyArchive" >> WriteStudyArchive(
        config.bucket, config.compression_level, config.overwrite, run_id)
    rows = written.stored | "BuildRows" >> BuildRows(
        config.collection, run_id, __version__, config.rules_id)
    checked = rows | "CheckRows" >> CheckRows()
    if config.metadata_output:
      checked.valid | "WriteRowsLocal" >> WriteRowsLocal(
          config.metadata_output, run_id)
    refused = []
    if config.bigquery_table:
      refused = [checked.valid | "WriteRowsBigQuery" >> WriteRowsBigQuery(
          config.bigquery_table, config.bigquery_method)]
    dead = [checked.dead_letter, *refused] | "AllDeadLetters" >> beam.Flatten()
    dead | "WriteDeadLetter" >> WriteDeadLetters(
        join_uri(config.dead_letter, f"dead_letter-{run_id}.json"))
    all_excluded = [*excluded, written[EXCLUDED]] | "AllExcluded" >> (
        beam.Flatten())
    _ = {"files": found.files, "excluded": all_excluded
         } | "WriteExcludedLedger" >> WriteExcludedLedger(
             ledger_path(config.bucket, config.collection, run_id),
             config.rules_id, run_id)
    report.update(
        excluded=all_excluded,
        stored=written.stored, skipped=written.skipped, rows=checked.valid,
        refused=refused[0] if refused else p | "NoneRefused" >> Once([]),
        dead_letter=dead)
  _ = report | "WriteRunReport" >> WriteRunReport(
      config.report, run_id, __version__, config.collection, config.plan)


def _counter(result, name: str) -> int:
  counters = result.metrics().query(MetricsFilter().with_name(name))["counters"]
  return sum((c.committed or c.attempted or 0) for c in counters)


def run(argv: Optional[List[str]] = None,
        console: Optional[Console] = None) -> dict:
  """Runs the pipeline; returns the run report. Raises OptionsError. With
  a console, says where the run goes and shows its progress there."""
  started = time.monotonic()
  argv = list(sys.argv[1:] if argv is None else argv)
  check_arguments(argv)
  use_emulator_if_configured()   # no-op unless BIGQUERY_EMULATOR_HOST is set
  options = PipelineOptions(argv)
  run_id = new_run_id()
  config = resolve(options.view_as(StorageOptions), run_id)
  try:
    check_input_roots(config.input_roots)
  except InputError as e:
    raise OptionsError(str(e)) from e
  has_current = check_targets(config, run_id)
  # Workers apply the emulator wiring too (no-op in production).
  options = PipelineOptions(argv + worker_plugin_args())
  runner = local_runner(options, argv)
  if runner is None and config.plan and "://" not in config.report:
    raise OptionsError("--plan on a remote runner needs --report gs://... "
                       "(the plan is written there; nothing is written to "
                       "the bucket)")
  builds_only = job_is_only_built(options)
  if builds_only:   # a template: nothing runs, nothing is written
    p = beam.Pipeline(runner=runner, options=options)
    build(p, config, run_id, None, has_current)
    p.run()
    return {"job": {"built": builds_only}}
  waits = not launched_by_flex_template(runner)
  if console:
    console.line(start_line(config, run_id))
  with _lease(config, run_id, waits), run_log(config.log), _local_run_folders(
      runner, run_id) as (spill_dir, progress_dir):
    recorded = (input_as_recorded(config, has_current) if runner is not None
                else None)
    if recorded is not None:   # nothing to read or write: no graph to run
      if isinstance(runner, _WarmWorkerRunner):
        runner.stop_workers()
      report = write_as_recorded(config, run_id, recorded)
    else:
      p = beam.Pipeline(runner=runner, options=options)
      build(p, config, run_id, spill_dir, has_current)
      progress = StorageProgress(len(listing_patterns(
          config.input_roots, config.entities)), config.plan)
      with live_progress(console if progress_dir else None,
                         lambda: read_progress(progress_dir), progress):
        result = p.run()
        if not waits:
          return {"job": {"submitted": _job_where(result, options)}}
        state = result.wait_until_finish()
      if state is not None and str(state) not in ("DONE", "PipelineState.DONE"):
        return {"job": {"ended": f"{_job_where(result, options)} ended {state}"}}
      report = read_report(config.report)
      report["summary"]["input_bytes_read"] = (
          _counter(result, "header_bytes_read")
          + _counter(result, "source_bytes_read"))
      report["summary"]["header_bytes_spilled"] = _counter(
          result, "header_bytes_spilled")

  report["summary"]["seconds"] = round(time.monotonic() - started, 1)
  report["report_path"] = config.report
  report["log"] = config.log
  report["metadata_output"] = config.metadata_output
  report["bucket"] = config.bucket
  report["bigquery_table"] = config.bigquery_table
  report["report_page"] = report_html.html_path(config.report)
  write_report(config.report, report)
  write_text_file(report["report_page"], report_html.render(report))
  return report


def input_as_recorded(config: RunConfig, has_current: bool
                      ) -> Optional[AsRecorded]:
  """Before a local run: its whole input as earlier runs recorded it, when
  nothing changed since (transforms/shortcut.py), decided here instead of
  by a graph and its worker processes that would find nothing to do; None
  otherwise. Local runs of at most DRIVER_DECISION_FILES files only: this
  process lists them and holds the current rows while it decides, where a
  larger run's graph does both on its workers (and a Dataflow launcher
  would read every current row itself)."""
  if not skips_unchanged(config, has_current):
    return None
  ledger_file = newest_ledger(config.bucket, config.collection)
  if ledger_file is None:   # every run writes one: no run to compare with
    return None
  listed = list(itertools.islice(
      list_input(config.input_roots, config.entities),
      DRIVER_DECISION_FILES + 1))
  if len(listed) > DRIVER_DECISION_FILES:
    return None
  return unchanged_input(
      listed, current_rows(config.bigquery_table, config.metadata_output),
      read_ledger(ledger_file), config.rules_id)


def write_as_recorded(config: RunConfig, run_id: str, recorded: AsRecorded
                      ) -> dict:
  """The report and the ledger of a run whose input is unchanged: what the
  graph would have written, with nothing read."""
  report = report_as_recorded(
      config.report, run_id, __version__, config.collection, recorded.seen,
      recorded.entities, recorded.studies, recorded.excluded, config.plan)
  if not config.plan:
    write_ledger(ledger_path(config.bucket, config.collection, run_id),
                 (entry._asdict() for entry in recorded.ledger))
  report["summary"].update(input_bytes_read=0, header_bytes_spilled=0)
  return report


def start_line(config: RunConfig, run_id: str) -> str:
  rows = [where for where in (
      config.metadata_output and f"{config.metadata_output}/rows-{run_id}-*.json",
      config.bigquery_table and f"BigQuery {config.bigquery_table}") if where]
  if config.plan:
    return (f"Plan {run_id}: {', '.join(config.input_roots)} -> "
            f"{config.bucket}/Collection/{config.collection}/ (nothing is "
            f"written but the plan, {config.report}); log {config.log}")
  return (f"Run {run_id}: {', '.join(config.input_roots)} -> "
          f"{config.bucket}/Collection/{config.collection}/, rows to "
          f"{' and '.join(rows)}; log {config.log}")


def job_is_only_built(options: PipelineOptions) -> Optional[str]:
  """Where the job goes when it is only built, not run: a template
  location (or a runner's dry run); None for a run."""
  location = options.view_as(GoogleCloudOptions).template_location
  if location:
    return f"Dataflow template {location}"
  if options.view_as(TestOptions).dry_run:
    return "a dry run of the runner (nothing submitted)"
  return None


def launched_by_flex_template(runner) -> bool:
  """A flex template's launcher submits the job and exits: it must not
  wait for the job (the launch would time out)."""
  return runner is None and bool(os.environ.get(
      "FLEX_TEMPLATE_PYTHON_PY_FILE"))


def _job_where(result, options: PipelineOptions) -> str:
  job_id = result.job_id() if hasattr(result, "job_id") else None
  cloud = options.view_as(GoogleCloudOptions)
  if job_id:
    return (f"Dataflow job {job_id} (https://console.cloud.google.com/"
            f"dataflow/jobs/{cloud.region}/{job_id}?project={cloud.project})")
  return "the job"


@contextlib.contextmanager
def _lease(config: RunConfig, run_id: str, waits: bool = True
           ) -> Iterator[None]:
  """The collection's lease for the run (transforms/lease.py); a plan
  writes nothing and takes none, and a launch that does not wait for its
  job cannot hold one for the job's length."""
  if config.plan or not waits:
    yield
    return
  lease = Lease(config.bucket, config.collection, run_id,
                config.lease_seconds)
  lease.acquire(wait=config.on_busy == "wait")
  try:
    yield
  finally:
    lease.release()


@contextlib.contextmanager
def _local_run_folders(runner, run_id: str
                       ) -> Iterator[Tuple[Optional[str], Optional[str]]]:
  """A local run's own folders under TMPDIR, deleted when it ends whatever
  the outcome: where images wait while they are grouped (spill), and where
  its processes count what they have done (progress, named to them by
  environment). (None, None) for other runners."""
  if runner is None:
    yield None, None
    return
  spill_dir = tempfile.mkdtemp(prefix=f"dicomstore-headers-{run_id}-")
  progress_dir = tempfile.mkdtemp(prefix=f"dicomstore-progress-{run_id}-")
  before = os.environ.get(PROGRESS_DIR_ENV)
  os.environ[PROGRESS_DIR_ENV] = progress_dir
  try:
    yield spill_dir, progress_dir
  finally:
    if before is None:
      os.environ.pop(PROGRESS_DIR_ENV, None)
    else:
      os.environ[PROGRESS_DIR_ENV] = before
    shutil.rmtree(spill_dir, ignore_errors=True)
    shutil.rmtree(progress_dir, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--help" in argv or "-h" in argv:
    print(help_text())
    return 0
  console = Console()
  with console.logging_to_console(verbose_requested(argv)):
    try:
      report = run(argv, console)
      if "job" in report:   # nothing ran here: say where the job is
        (outcome, where), = report["job"].items()
        if outcome == "ended":
          console.line(f"error: {where}", sys.stderr)
          return 1
        console.line(f"{outcome.capitalize()}: {where}")
        return 0
    except OptionsError as e:
      console.line(f"error: {e}", sys.stderr)
      return 2
    except CollectionBusy as e:
      console.line(f"error: {e}; run again later, or with --on_busy=wait",
                   sys.stderr)
      return 3
  console.line(format_summary(report))
  for line in where_lines(report):
    console.line(line)
  if report["summary"]["failed"]:
    console.line(f"error: {report['summary']['failed']} files could not be "
                 f"{'checked' if report['plan'] else 'stored'}; see 'failed' "
                 "in the report", sys.stderr)
    return 1
  return 0


def where_lines(report: dict) -> List[str]:
  """Where a person finds what the run wrote."""
  if report["plan"]:
    return [f"  plan {report['report_page']} (and {report['report_path']}); "
            f"files that would be stored listed in {report['stored_files']}; "
            f"log {report['log']}"]
  lines = [f"  objects under {report['bucket']}/Collection/"
           f"{report['collection']}/"]
  if report["metadata_output"] and report["summary"]["rows"]:
    lines.append(f"  rows in {report['metadata_output']}/rows-"
                 f"{report['run_id']}-*.json")
  if report.get("bigquery_table"):
    lines.append(f"  rows in BigQuery {report['bigquery_table']} "
                 f"(current rows: view {report['bigquery_table']}_current)")
  lines.append(f"  report {report['report_page']} (and "
               f"{report['report_path']}), stored files listed in "
               f"{report['stored_files']}, log {report['log']}")
  return lines
