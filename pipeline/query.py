"""Run a BigQuery query over local rows, as the table would answer it.

  python -m pipeline.query --metadata_output DIR "SELECT ... FROM dicom_current ..."
  python -m pipeline.query --metadata_output DIR @queries/localizer_images.sql
      [--param name=value | --param name:INT64=5 ...] [--format table|jsonl|csv]

The tables dicom (every row) and dicom_current (the current rows, the same
view as BigQuery's) are the row files in DIR; PROJECT.DATASET.dicom_current
names them too, so the files in queries/ run unchanged.
"""
import csv
import datetime
import json
import sys
from typing import Any, Dict, Iterable, List, Optional

from pipeline.cli import OneLineParser
from transforms.local_sql import (PARAMETER_TYPES, LocalRows, QueryError,
                                  parse_parameters, read_sql)

# Widest a cell is shown in the table form; --format jsonl shows all.
MAX_CELL = 80


def _parser() -> OneLineParser:
  p = OneLineParser(
      prog="python -m pipeline.query", description=__doc__.split("\n\n")[0],
      allow_abbrev=False)
  p.add_argument("sql", help="the query (BigQuery SQL), or @FILE.sql")
  p.add_argument("--metadata_output", required=True,
                 help="the folder of row files (rows-*.json) a run wrote")
  p.add_argument("--param", action="append", default=[],
                 metavar="NAME[:TYPE]=VALUE",
                 help="a value for @NAME; TYPE one of "
                      f"{', '.join(PARAMETER_TYPES)} (default STRING)")
  p.add_argument("--format", choices=["table", "jsonl", "csv"],
                 default="table", help="how rows are printed (default: table)")
  return p


def plain(value: Any) -> Any:
  """A value as JSON writes it: dates and times as ISO 8601 text."""
  if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
    return value.isoformat()
  if isinstance(value, dict):
    return {k: plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [plain(v) for v in value]
  return value


def _cell(value: Any) -> str:
  value = plain(value)
  if value is None:
    return "NULL"
  text = (json.dumps(value, ensure_ascii=False)
          if isinstance(value, (dict, list)) else str(value))
  return text if len(text) <= MAX_CELL else text[:MAX_CELL - 3] + "..."


def write_table(names: List[str], rows: Iterable[Dict[str, Any]], out) -> int:
  cells = [[_cell(r[n]) for n in names] for r in rows]
  widths = [max([len(n)] + [len(c[i]) for c in cells])
            for i, n in enumerate(names)]
  line = "  ".join
  out.write(line(n.ljust(w) for n, w in zip(names, widths)).rstrip() + "\n")
  out.write(line("-" * w for w in widths) + "\n")
  for c in cells:
    out.write(line(v.ljust(w) for v, w in zip(c, widths)).rstrip() + "\n")
  out.write(f"({len(cells)} row{'s' if len(cells) != 1 else ''})\n")
  return len(cells)


def write_jsonl(names: List[str], rows: Iterable[Dict[str, Any]], out) -> int:
  n = 0
  for n, row in enumerate(rows, 1):
    out.write(json.dumps(plain(row), ensure_ascii=False) + "\n")
  del names
  return n


def write_csv(names: List[str], rows: Iterable[Dict[str, Any]], out) -> int:
  writer = csv.writer(out)
  writer.writerow(names)
  n = 0
  for n, row in enumerate(rows, 1):
    writer.writerow(["" if row[k] is None else
                     json.dumps(plain(row[k]), ensure_ascii=False)
                     if isinstance(row[k], (dict, list)) else plain(row[k])
                     for k in names])
  return n


WRITERS = {"table": write_table, "jsonl": write_jsonl, "csv": write_csv}


def main(argv: Optional[List[str]] = None) -> int:
  args = _parser().parse_args(argv)
  try:
    names, rows = LocalRows(args.metadata_output).query(
        read_sql(args.sql), parse_parameters(args.param))
    WRITERS[args.format](names, rows, sys.stdout)
  except QueryError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
