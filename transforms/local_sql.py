"""BigQuery SQL over local row files: the same queries researchers run on
the table, answered by DuckDB from a metadata folder's rows-*.json.

The folder's rows are the table `dicom`, and `dicom_current` is the same
view the BigQuery table has (transforms/bigquery.py current_view_sql, one
rule for both). A query is read in BigQuery's dialect and written in
DuckDB's by sqlglot; any table named dicom or dicom_current, with or
without PROJECT.DATASET before it, is the local one, so the files in
queries/ run unchanged. JSON_QUERY_ARRAY and JSON_VALUE_ARRAY give NULL for
a value that is not an array, as BigQuery's do (DuckDB's cast would fail),
and JSON paths are parenthesized (DuckDB's arrows bind loosely).
"""

import datetime
import json
from typing import Any, Dict, Iterator, List, Sequence, Tuple

from transforms.bigquery import current_view_sql
from transforms.schema import TABLE_SCHEMA, row_files

LOCAL_TABLES = ("dicom", "dicom_current")
# Query parameters: @name, given as name=value (a STRING) or
# name:TYPE=value, TYPE one of these BigQuery types.
PARAMETER_TYPES = {
    "STRING": str, "INT64": int, "FLOAT64": float, "BOOL": (
        lambda v: {"true": True, "false": False}[v.lower()]),
    "DATE": datetime.date.fromisoformat,
}


class QueryError(ValueError):
  """A query that cannot be read or run, with the reason."""


def parse_parameters(given: Sequence[str]) -> Dict[str, Tuple[str, Any]]:
  """['code=24627-0', 'n:INT64=5'] -> {'code': ('STRING', '24627-0'), ...}."""
  params = {}
  for item in given:
    name, sep, value = item.partition("=")
    if not sep or not name:
      raise QueryError(f"--param {item!r}: expected name=value or "
                       "name:TYPE=value")
    name, _, type_ = name.partition(":")
    type_ = (type_ or "STRING").upper()
    if type_ not in PARAMETER_TYPES:
      raise QueryError(f"--param {item!r}: type {type_} is not one of "
                       f"{', '.join(PARAMETER_TYPES)}")
    try:
      params[name] = (type_, PARAMETER_TYPES[type_](value))
    except (ValueError, KeyError) as e:
      raise QueryError(f"--param {item!r}: {value!r} is not a {type_}") from e
  return params


def read_sql(text: str) -> str:
  """The query itself, or the text of the file named by '@file.sql'."""
  if text.startswith("@"):
    try:
      with open(text[1:], encoding="utf-8") as f:
        return f.read()
    except OSError as e:
      raise QueryError(f"{text[1:]}: {e.strerror}") from e
  return text


def _array_or_null(cast_to: str):
  def generate(self, e) -> str:
    value = f"({self.sql(e, 'this')} -> {self.sql(e, 'expression')})"
    return (f"CASE WHEN json_type({value}) = 'ARRAY' "
            f"THEN CAST({value} AS {cast_to}) END")
  return generate


_dialect = None


def _sqlglot():
  """sqlglot and the DuckDB dialect the local tables need, imported when
  first used: only the local query path needs them (the 'local' extra)."""
  global _dialect  # pylint: disable=global-statement
  try:
    import sqlglot
    from sqlglot import exp
    from sqlglot.dialects.duckdb import DuckDB
  except ImportError as e:
    raise QueryError("queries over local rows need DuckDB and sqlglot: pip "
                     "install 'dicom-storage-pipeline[local]'") from e
  if _dialect is None:
    arrow = DuckDB.Generator.TRANSFORMS[exp.JSONExtract]

    class LocalDuckDB(DuckDB):
      class Generator(DuckDB.Generator):
        # DuckDB's arrows bind more loosely than AND and =: without the
        # parentheses, "a = 1 AND JSON_VALUE(m, p) = 'x'" reads wrong.
        TRANSFORMS = {**DuckDB.Generator.TRANSFORMS,
                      exp.JSONExtract: lambda self, e: f"({arrow(self, e)})",
                      exp.JSONExtractArray: _array_or_null("JSON[]"),
                      exp.JSONValueArray: _array_or_null("VARCHAR[]")}

        def jsonextractscalar_sql(self, expression):
          return f"({super().jsonextractscalar_sql(expression)})"
    _dialect = LocalDuckDB
  return sqlglot, exp, _dialect


def _one_query(sql: str):
  """The query's syntax tree, read as BigQuery SQL."""
  sqlglot, _, _ = _sqlglot()
  try:
    statements = [s for s in sqlglot.parse(sql, read="bigquery")
                  if s is not None]
  except sqlglot.errors.ParseError as e:
    raise QueryError(f"the query cannot be read as BigQuery SQL: {e}") from e
  if len(statements) != 1:
    raise QueryError(f"expected one query, found {len(statements)}")
  return statements[0]


def _retarget(tree, table_for) -> None:
  """Replaces each table named dicom or dicom_current (however qualified)
  by table_for(its name, its alias)."""
  _, exp, _ = _sqlglot()
  for found in list(tree.find_all(exp.Table)):
    if found.name in LOCAL_TABLES:
      found.replace(table_for(found.name, found.args.get("alias")))


def to_duckdb(sql: str) -> str:
  """A BigQuery query as DuckDB runs it over the local tables."""
  _, exp, dialect = _sqlglot()
  tree = _one_query(sql)
  _retarget(tree, lambda name, alias: exp.Table(
      this=exp.to_identifier(name), alias=alias))
  return tree.sql(dialect=dialect)


def on_table(sql: str, table: str) -> str:
  """A query with its dicom and dicom_current tables (however qualified)
  made the BigQuery table PROJECT:DATASET.TABLE and its current view, so
  that one query file runs locally and on any table."""
  _, exp, _ = _sqlglot()
  project, _, rest = table.partition(":")
  dataset, _, table_name = rest.partition(".")
  tree = _one_query(sql)
  _retarget(tree, lambda name, alias: exp.Table(
      this=exp.to_identifier(table_name + name[len("dicom"):], quoted=True),
      db=exp.to_identifier(dataset, quoted=True),
      catalog=exp.to_identifier(project, quoted=True), alias=alias))
  return tree.sql(dialect="bigquery")


def _duckdb_type(field: Dict[str, Any]) -> str:
  if field["type"] == "RECORD":
    base = "STRUCT(" + ", ".join(f'"{f["name"]}" {_duckdb_type(f)}'
                                 for f in field["fields"]) + ")"
  else:
    base = {"STRING": "VARCHAR", "INTEGER": "BIGINT", "FLOAT": "DOUBLE",
            "DATE": "DATE", "TIMESTAMP": "TIMESTAMPTZ", "JSON": "JSON",
            "BOOLEAN": "BOOLEAN"}[field["type"]]
  return base + "[]" if field.get("mode") == "REPEATED" else base


def _columns() -> str:
  """The row schema as DuckDB's read_json takes it."""
  return "{" + ", ".join(f"'{f['name']}': '{_duckdb_type(f)}'"
                         for f in TABLE_SCHEMA["fields"]) + "}"


class LocalRows:
  """A metadata folder's row files as the tables dicom and dicom_current."""

  def __init__(self, metadata_dir: str):
    _sqlglot()   # says what to install when missing
    import duckdb
    self.files = row_files(metadata_dir)
    self.con = duckdb.connect()
    self.con.execute("SET TimeZone = 'UTC'")
    if self.files:
      quoted = ", ".join("'" + f.replace("'", "''") + "'" for f in self.files)
      self.con.execute(
          f"CREATE VIEW dicom AS SELECT * FROM read_json([{quoted}], "
          f"format = 'newline_delimited', columns = {_columns()})")
    else:   # no rows yet: an empty table with the schema
      self.con.execute("CREATE TABLE dicom (" + ", ".join(
          f'"{f["name"]}" {_duckdb_type(f)}' for f in TABLE_SCHEMA["fields"])
                       + ")")
    self.con.execute("CREATE VIEW dicom_current AS " +
                     to_duckdb(current_view_sql("local-rows:local.dicom")))

  def query(self, sql: str, params: Dict[str, Tuple[str, Any]] = None
            ) -> Tuple[List[str], Iterator[Dict[str, Any]]]:
    """(column names, rows as dicts, JSON columns parsed) of a BigQuery
    query."""
    import duckdb
    local = to_duckdb(sql)
    values = {k: v for k, (_, v) in (params or {}).items()}
    try:
      cursor = self.con.execute(local, values or None)
    except duckdb.Error as e:
      raise QueryError(str(e).splitlines()[0]) from e
    names = [d[0] for d in cursor.description]
    json_columns = {i for i, d in enumerate(cursor.description)
                    if str(d[1]) == "JSON"}

    def rows():
      while True:
        batch = cursor.fetchmany(1024)
        if not batch:
          return
        for values_ in batch:
          yield {name: (json.loads(v) if i in json_columns and v is not None
                        else v)
                 for i, (name, v) in enumerate(zip(names, values_))}
    return names, rows()
