"""The graph is built with Beam's construction-time type check on, and the
transforms' type hints are real types Beam reads (not strings it turns into
Any, as postponed annotations made them)."""
import logging

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, TypeOptions
from apache_beam.typehints.decorators import TypeCheckError

from pipeline.options import StorageOptions, resolve
from pipeline.run import build
from transforms.dicom import ReadHeaders
from transforms.rows import BuildRows


def _options(tmp_path, *extra):
  return PipelineOptions([f"--input={tmp_path}", f"--bucket={tmp_path / 'b'}",
                          "--collection=C1",
                          f"--metadata_output={tmp_path / 'm'}", *extra])


@pytest.mark.parametrize("extra", [[], ["--phi_rules=folder,header,deid"]])
def test_the_whole_graph_passes_the_type_check(tmp_path, caplog, extra):
  options = _options(tmp_path, *extra)
  assert options.view_as(TypeOptions).pipeline_type_check
  config = resolve(options.view_as(StorageOptions), "run1")
  caplog.set_level(logging.INFO)
  for spill_dir in (None, str(tmp_path / "spill")):
    p = beam.Pipeline(options=options)
    build(p, config, "run1", spill_dir)   # raises TypeCheckError if not
  unread = [r.getMessage() for r in caplog.records
            if "string literal type hint" in r.getMessage()
            or "type hint will be ignored" in r.getMessage()]
  assert unread == []


def test_a_mismatched_input_fails_when_the_graph_is_built():
  p = beam.Pipeline()
  with pytest.raises(TypeCheckError, match="SourceFile"):
    _ = p | beam.Create([1, 2]) | ReadHeaders()
  with pytest.raises(TypeCheckError, match="StoredStudy"):
    _ = p | "Strings" >> beam.Create(["a"]) | BuildRows("C1", "r", "0")
