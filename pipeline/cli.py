"""What every command line of the pipeline shares, without importing Beam
(the commands that only read start in a fraction of a second)."""

import argparse
import os
import re
import sys
from typing import Optional


class OptionsError(ValueError):
  """A bad option: reported as one line naming it, before any work."""


class OneLineParser(argparse.ArgumentParser):
  """The commands' parser (export, verify): a bad argument is one line,
  'error: ...', and exit status 2, as for a run."""

  def error(self, message):
    sys.stderr.write(f"error: {message} (see --help)\n")
    sys.exit(2)


TABLE_PATTERN = re.compile(
    r"^(?P<project>[a-z][a-z0-9.:-]{4,61}[a-z0-9]):(?P<dataset>[A-Za-z0-9_]{1,1024})"
    r"\.(?P<table>[A-Za-z0-9_]{1,1024})$")


def rows_table(opts) -> Optional[str]:
  """PROJECT:DATASET.TABLE of the rows, from --bigquery_table, or from
  --bigquery_project and --collection; None when BigQuery is not named.
  Raises OptionsError for a malformed one."""
  table = getattr(opts, "bigquery_table", None)
  if table:
    if not TABLE_PATTERN.match(table):
      raise OptionsError(f"--bigquery_table {table!r} is not "
                         "PROJECT:DATASET.TABLE")
    return table
  project = getattr(opts, "bigquery_project", None)
  if project:
    table = f"{project}:{opts.collection}.dicom"
    if not TABLE_PATTERN.match(table):
      raise OptionsError(f"--bigquery_project {project!r} is not a project "
                         "id")
    return table
  return None


def env_bucket() -> Optional[str]:
  """$GOOGLE_CLOUD_STORAGE; the original config named a bare bucket
  ('som-pacs'), which means gs://som-pacs."""
  value = os.environ.get("GOOGLE_CLOUD_STORAGE")
  if value and "://" not in value and not value.startswith("/"):
    return "gs://" + value
  return value
