"""The flex template folder stays consistent with the code."""
import json
import re
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.cli import rows_table
from pipeline.options import StorageOptions, resolve

TEMPLATES = Path(__file__).parents[1] / "templates"
METADATA = json.loads((TEMPLATES / "metadata.json").read_text())
PARAMS = {p["name"]: p for p in METADATA["parameters"]}
REQUIRED = {"input", "bucket", "collection"}


def _option_names():
  import argparse
  parser = argparse.ArgumentParser()
  StorageOptions._add_argparse_args(parser)  # pylint: disable=protected-access
  return {a.dest for a in parser._actions if a.dest != "help"}  # pylint: disable=protected-access


def test_parameters_match_the_options_one_to_one():
  assert set(PARAMS) == _option_names()
  assert {n for n, p in PARAMS.items() if not p.get("isOptional")} == REQUIRED
  for p in PARAMS.values():
    assert p["label"] and p["helpText"] and p["regexes"]


def _example(param):
  return re.search(r"Example: (\S+)", param["helpText"]).group(1)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_each_regex_accepts_its_example_and_the_parser_takes_it(name):
  example = _example(PARAMS[name])
  assert all(re.match(r, example) for r in PARAMS[name]["regexes"]), example
  opts = PipelineOptions([f"--{name}={example}"]).view_as(StorageOptions)
  value = getattr(opts, name)
  assert str(value).lower() == example.lower()


MISTAKES = {
    "input": ["/local/path", "gs://", "gs://b/a,/local", "s3://b/x"],
    "bucket": ["radiology", "gs://radiology/prefix", "gs://Bad_Bucket"],
    "collection": ["IRB-41449", "IRB 41449", ""],
    "bigquery_project": ["My_Project", "p", "proj:ds"],
    "bigquery_table": ["proj.ds.table", "proj:ds", "proj:ds.t-1"],
    "bigquery_method": ["streaming", "STORAGE_WRITE_API"],
    "metadata_output": ["/tmp/rows", "rows"],
    "dead_letter": ["/tmp/dl"],
    "report": ["gs://b/report", "/tmp/r.json"],
    "entities_file": ["/tmp/e.txt", "gs://b"],
    "item_id": ["Accession Number", "0080,0050"],
    "phi_rules": ["folder,", "pixels", "folder header"],
    "deid_recipe": ["deid.dicom"],
    "compression_level": ["4", "-1", "fast"],
    "overwrite": ["yes", "True"],
    "verbose": ["yes", "1"],
    "plan": ["yes", "TRUE"],
    "full_scan": ["yes", "on"],
    "on_busy": ["stop", "Wait"],
    "lease_seconds": ["ten", "-5"],
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_each_regex_rejects_obvious_mistakes(name):
  for mistake in MISTAKES[name]:
    assert not all(re.match(r, mistake) for r in PARAMS[name]["regexes"]), (
        name, mistake)


def test_dockerfile_uses_the_pinned_beam_version():
  setup = (TEMPLATES.parent / "setup.py").read_text()
  pinned = re.search(r'BEAM_VERSION = "([^"]+)"', setup).group(1)
  dockerfile = (TEMPLATES / "Dockerfile").read_text()
  images = re.findall(r"^FROM apache/beam_python3\.11_sdk:(\S+)", dockerfile,
                      re.M)
  assert images == [pinned]
  import apache_beam
  assert apache_beam.__version__ == pinned


@pytest.mark.parametrize("body", sorted((TEMPLATES / "schedules").glob("*.json")),
                         ids=lambda p: p.name)
def test_scheduled_launch_bodies_name_real_parameters(body):
  launch = json.loads(body.read_text())["launchParameter"]
  params = launch["parameters"]
  assert REQUIRED <= set(params) <= set(PARAMS)
  for name, value in params.items():
    assert all(re.match(r, value) for r in PARAMS[name]["regexes"]), (name, value)
  # The options parser takes them and resolves a destination for the rows.
  argv = [f"--{k}={v}" for k, v in params.items()
          if k not in ("entities_file", "deid_recipe")]
  opts = PipelineOptions(argv).view_as(StorageOptions)
  assert rows_table(opts) == "my-research-project:IRB41449.dicom"
  config = resolve(opts, "run1")
  assert config.bucket == params["bucket"]
