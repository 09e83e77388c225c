"""Where rows go: checked against the schema first, then to local files
(newline-delimited JSON that `bq load` accepts with schema.json); rows that
do not fit go to the dead-letter output with their errors, never dropped.
"""

import json
from typing import Any, Dict, Iterable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.gcp.bigquery_tools import RetryStrategy
from apache_beam.metrics import Metrics

from transforms.bigquery import TABLE_PARAMETERS
from transforms.keys import join_uri
from transforms.once import Once
from transforms.schema import (METADATA, METADATA_LAST, ROWS_PREFIX,
                               SCHEMA_FILE, TABLE_SCHEMA, row_errors,
                               schema_json)

DEAD_LETTER_TAG = "dead_letter"


def dead_letter_record(row: Dict[str, Any], error: str, stage: str) -> Dict[str, Any]:
  return {"stage": stage, "error": error,
          "sop_instance_uid": row.get("sop_instance_uid"),
          "row": row}


class _CheckRow(beam.DoFn):
  def __init__(self):
    self.invalid = Metrics.counter("rows", "rows_invalid")

  def process(self, row: Dict[str, Any]) -> Iterable[Dict[str, Any]]:
    errors = row_errors(row)
    if errors:
      self.invalid.inc()
      yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, dead_letter_record(
          row, "; ".join(errors), "schema check"))
    else:
      yield row


class CheckRows(beam.PTransform):
  """Rows -> rows that fit the schema (main), the rest ('dead_letter')."""

  def expand(self, rows):
    return rows | "CheckRow" >> beam.ParDo(_CheckRow()).with_outputs(
        DEAD_LETTER_TAG, main="valid")


def json_line(record: Dict[str, Any]) -> str:
  return json.dumps(record, sort_keys=True, ensure_ascii=False)


def row_line(row: Dict[str, Any]) -> str:
  """A row as newline-delimited JSON takes it: `metadata`, which rows
  carry as JSON text, as the nested object it is (a JSON column loads an
  object; a string would load as a JSON string). Spliced in as written,
  at the end, rather than parsed and serialized again."""
  text = row.get(METADATA)
  if not isinstance(text, str):
    return json_line(row)
  rest = json_line({k: v for k, v in row.items() if k != METADATA})
  return f"{rest[:-1]}{METADATA_LAST}{text}}}"


def write_text_file(path: str, text: str) -> str:
  with FileSystems.create(path) as f:
    f.write(text.encode("utf-8"))
  return path


class WriteJsonLines(beam.PTransform):
  """Dicts -> newline-delimited JSON files DIR/<name>-SSSSS-of-NNNNN.json,
  one per bundle of writing: rows are not shuffled again to fill one file."""

  def __init__(self, directory: str, name: str, to_line=json_line):
    super().__init__()
    self.directory = directory
    self.name = name
    self.to_line = to_line

  def expand(self, records):
    return (records
            | "ToJson" >> beam.Map(self.to_line)
            | "Write" >> beam.io.WriteToText(
                join_uri(self.directory, self.name), file_name_suffix=".json"))


def _write_lines(keyed_records, path: str):
  lines = sorted(json_line(r) + "\n" for r in keyed_records[1])
  write_text_file(path, "".join(lines))
  yield path


class WriteDeadLetters(beam.PTransform):
  """Dead-letter records -> one newline-delimited JSON file, written only
  when there are any. Written whole by one worker (dead letters are few),
  which also spares object stores a rename/compose step."""

  def __init__(self, path: str):
    super().__init__()
    self.path = path

  def expand(self, records):
    # Grouped under one key: no group, no file, when there are none.
    return (records
            | "OneKey" >> beam.Map(lambda record: (None, record))
            | "Collect" >> beam.GroupByKey()
            | "Write" >> beam.FlatMap(_write_lines, self.path))


class WriteRowsLocal(beam.PTransform):
  """Rows -> DIR/rows-<run id>-SSSSS-of-NNNNN.json and DIR/schema.json, for
  `bq load`.

  Files named by run, never overwritten: like the BigQuery table, the folder
  is an append-only record, and a re-run that skips stored studies adds an
  empty file rather than erasing the rows of earlier runs.
  """

  def __init__(self, directory: str, run_id: str):
    super().__init__()
    self.directory = directory
    self.run_id = run_id

  def expand(self, rows):
    schema_path = join_uri(self.directory, SCHEMA_FILE)
    _ = (rows.pipeline
         | "SchemaOnce" >> Once([schema_path])
         | "WriteSchema" >> beam.Map(write_text_file, schema_json()))
    return rows | "WriteRows" >> WriteJsonLines(
        self.directory, f"{ROWS_PREFIX}{self.run_id}", row_line)


def _dead_letter(failed) -> Dict[str, Any]:
  _, row, errors = failed
  return {"stage": "bigquery insert",
          "error": json.dumps(errors, default=str),
          "sop_instance_uid": row.get("sop_instance_uid"), "row": row}


def _metadata_as_object(row: Dict[str, Any]) -> Dict[str, Any]:
  return {**row, METADATA: json.loads(row[METADATA])}


class WriteRowsBigQuery(beam.PTransform):
  """Rows -> BigQuery; returns the rows BigQuery refused, as dead letters.

  Streaming inserts retry transient errors only (RETRY_ON_TRANSIENT_ERROR):
  a row refused for good is returned, never retried forever, never dropped.
  """

  def __init__(self, table: str, method: str = "STREAMING_INSERTS"):
    super().__init__()
    self.table = table
    self.method = method

  def expand(self, rows):
    if self.method != "STREAMING_INSERTS":
      # A load job takes a JSON column as the nested value; a streaming
      # insert as JSON text, which rows carry already.
      rows = rows | "MetadataAsObject" >> beam.Map(_metadata_as_object)
    result = rows | "WriteToBigQuery" >> beam.io.WriteToBigQuery(
        table=self.table,
        schema=TABLE_SCHEMA,
        create_disposition=beam.io.BigQueryDisposition.CREATE_IF_NEEDED,
        write_disposition=beam.io.BigQueryDisposition.WRITE_APPEND,
        method=self.method,
        insert_retry_strategy=RetryStrategy.RETRY_ON_TRANSIENT_ERROR,
        additional_bq_parameters=TABLE_PARAMETERS)
    if self.method == "STREAMING_INSERTS":
      return (result.failed_rows_with_errors
              | "RefusedRows" >> beam.Map(_dead_letter))
    # Load jobs succeed or fail whole (and fail the run); rows were checked
    # against the schema before, so none is refused row by row.
    return rows.pipeline | "NoRefusedRows" >> Once([])
