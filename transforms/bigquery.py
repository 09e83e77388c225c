"""The rows' BigQuery table and its "current" view: made, checked and
queried (rows are written by sinks.WriteRowsBigQuery). No Beam here, so
that the commands that only query (export, verify, fetch) start quickly.

The table `<collection>.dicom` is append-only: every time a study object is
written, its rows are appended with storage.written_at set to that object's
creation time. The view `<table>_current` is what researchers query: for
each study, only the rows of its newest object; for each image, one row.
That makes re-runs and retries safe despite BigQuery's best-effort
streaming de-duplication: a row inserted twice, or rows of a superseded
object, are never "current". See the README ("Re-runs").
"""

from typing import Any, Dict, Iterable, List, Optional, Tuple

from transforms import bigquery_emulator
from transforms.schema import TABLE_SCHEMA

# Month partitions by study date (a day per partition would pass BigQuery's
# partition limit over decades of studies); clustered for the lookups
# researchers make: one entity, one study, one modality.
TABLE_PARAMETERS = {
    "timePartitioning": {"type": "MONTH", "field": "StudyDate"},
    "clustering": {"fields": ["entity_id", "study_instance_uid", "Modality"]},
}
CURRENT_VIEW_SUFFIX = "_current"


def split_table(table: str) -> Tuple[str, str, str]:
  """'PROJECT:DATASET.TABLE' -> (project, dataset, table)."""
  project, _, rest = table.partition(":")
  dataset, _, name = rest.partition(".")
  return project, dataset, name


def sql_table(table: str, suffix: str = "") -> str:
  project, dataset, name = split_table(table)
  return f"`{project}.{dataset}.{name}{suffix}`"


def bigquery_client(project: str):
  """google-cloud-bigquery client; anonymous against an emulator."""
  from google.cloud import bigquery
  if bigquery_emulator.emulator_host():
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    return bigquery.Client(
        project=project, credentials=AnonymousCredentials(),
        client_options=ClientOptions(
            api_endpoint=bigquery_emulator.emulator_host()))
  return bigquery.Client(project=project)


def current_view_sql(table: str) -> str:
  """Rows of each study's newest object, one per image. (Every column is
  qualified by the table's alias: bqemulator otherwise loses the storage
  record inside a query that also has an UNNEST.)"""
  return f"""
SELECT * EXCEPT (_written_at, _newest, _copy) FROM (
  SELECT t.*, t.storage.written_at AS _written_at,
    MAX(t.storage.written_at) OVER (
        PARTITION BY t.entity_id, t.study_instance_uid) AS _newest,
    ROW_NUMBER() OVER (
        PARTITION BY t.entity_id, t.study_instance_uid, t.sop_instance_uid,
                     t.storage.written_at
        ORDER BY t.run_id) AS _copy
  FROM {sql_table(table)} AS t)
WHERE _written_at = _newest AND _copy = 1"""


class IncompatibleTable(ValueError):
  """The table exists with a schema the rows do not fit."""


def schema_differences(fields: List[Dict[str, Any]],
                       wanted: List[Dict[str, Any]] = None,
                       prefix: str = "") -> List[str]:
  """How a table's fields (API form) differ from the rows' schema: a
  column missing, or of another type or mode."""
  wanted = TABLE_SCHEMA["fields"] if wanted is None else wanted
  have = {f["name"]: f for f in fields}
  differences = []
  for w in wanted:
    name = prefix + w["name"]
    f = have.get(w["name"])
    if f is None:
      differences.append(f"no column {name}")
      continue
    kind, want = (x["type"].replace("STRUCT", "RECORD") for x in (f, w))
    repeated, want_repeated = (x.get("mode") == "REPEATED" for x in (f, w))
    if kind != want:
      differences.append(f"{name} is {kind}, not {want}")
    elif repeated != want_repeated:
      differences.append(f"{name} is {'' if repeated else 'not '}REPEATED")
    elif w.get("fields"):
      differences += schema_differences(f.get("fields", []), w["fields"],
                                        name + ".")
  return differences


def check_table_schema(table: str, fields: List[Dict[str, Any]]) -> None:
  """Raises IncompatibleTable, in one line naming the table and the fix,
  when rows of this version would not fit it (say a table of an earlier
  version, whose metadata is STRING): rows are never mixed into it."""
  differences = schema_differences(fields)
  if differences:
    raise IncompatibleTable(
        f"BigQuery table {table} does not fit this pipeline's rows "
        f"({'; '.join(differences[:3])}"
        f"{'; ...' if len(differences) > 3 else ''}): it was made by an "
        "earlier version. Name a new table with --bigquery_table "
        "PROJECT:DATASET.NEW_TABLE: the stored objects stay as they are and "
        "their rows are written there (--overwrite rewrites the objects "
        "too)")


def ensure_dataset_and_view(table: str) -> None:
  """Creates the dataset when missing (Beam creates tables, not datasets),
  the table from the one schema, and the current view. Raises
  IncompatibleTable when the table exists with another schema."""
  from google.cloud import bigquery
  project, dataset, name = split_table(table)
  client = bigquery_client(project)
  client.create_dataset(bigquery.Dataset(f"{project}.{dataset}"),
                        exists_ok=True)
  t = bigquery.Table(f"{project}.{dataset}.{name}",
                     schema=[bigquery.SchemaField.from_api_repr(f)
                             for f in TABLE_SCHEMA["fields"]])
  t.time_partitioning = bigquery.TimePartitioning(
      type_=TABLE_PARAMETERS["timePartitioning"]["type"],
      field=TABLE_PARAMETERS["timePartitioning"]["field"])
  t.clustering_fields = TABLE_PARAMETERS["clustering"]["fields"]
  existing = client.create_table(t, exists_ok=True)
  check_table_schema(table, [f.to_api_repr() for f in existing.schema])
  view = bigquery.Table(f"{project}.{dataset}.{name}{CURRENT_VIEW_SUFFIX}")
  view.view_query = current_view_sql(table)
  client.create_table(view, exists_ok=True)


def table_exists(table: str) -> bool:
  """Whether the table exists (raising IncompatibleTable if it does not fit
  the rows), creating nothing: what a plan may do."""
  from google.api_core.exceptions import NotFound
  project, dataset, name = split_table(table)
  try:
    existing = bigquery_client(project).get_table(f"{project}.{dataset}.{name}")
  except NotFound:
    return False
  check_table_schema(table, [f.to_api_repr() for f in existing.schema])
  return True


def query_rows(table: str, sql: str, params: Dict[str, Any]) -> Iterable[dict]:
  """Rows of a query in the table's project, page by page. params: name ->
  a STRING value, or (BigQuery type, value)."""
  from google.cloud import bigquery
  project = split_table(table)[0]
  config = bigquery.QueryJobConfig(query_parameters=[
      bigquery.ScalarQueryParameter(
          k, *(v if isinstance(v, tuple) else ("STRING", v)))
      for k, v in params.items()])
  for row in bigquery_client(project).query(sql, job_config=config).result():
    yield dict(row.items())


def find_row_in_table(table: str, sop_instance_uid: str) -> Optional[dict]:
  """The current row of one image (for python -m pipeline.fetch)."""
  rows = list(query_rows(table, f"""
      SELECT storage.uri AS uri, storage.member_offset AS member_offset,
             storage.member_length AS member_length,
             storage.member_sha256 AS member_sha256
      FROM {sql_table(table, CURRENT_VIEW_SUFFIX)}
      WHERE sop_instance_uid = @sop
      ORDER BY storage.written_at DESC LIMIT 1""", {"sop": sop_instance_uid}))
  return {"storage": rows[0]} if rows else None
