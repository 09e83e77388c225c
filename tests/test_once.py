"""transforms/once.py: values known when the graph is built, every Once of
a pipeline from one Impulse."""
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from conftest import local_pipeline

from pipeline.options import StorageOptions, resolve
from pipeline.run import build
from transforms.once import Once

IMPULSE = "beam:transform:impulse:v1"


def _impulses(p: beam.Pipeline) -> list:
  return [t.unique_name for t in
          p.to_runner_api().components.transforms.values()
          if t.spec.urn == IMPULSE]


def test_each_once_gives_its_values_once():
  with local_pipeline() as p:
    assert_that(p | "Two" >> Once([1, ("a", None)]),
                equal_to([1, ("a", None)]), label="CheckTwo")
    assert_that(p | "None" >> Once([]), equal_to([]), label="CheckNone")
    assert_that(p | "One" >> Once(["x"]), equal_to(["x"]), label="CheckOne")
    # assert_that's own Creates aside
    assert [n for n in _impulses(p) if not n.startswith("Check")] == [
        "Two/SharedImpulse"]


def test_a_run_starts_from_one_impulse_of_its_own(tmp_path):
  """Every root of the storage graph is a Once but Beam's own file sink's
  (WriteToText's DoOnce)."""
  options = PipelineOptions([f"--input={tmp_path}",
                             f"--bucket={tmp_path / 'b'}", "--collection=C1",
                             f"--metadata_output={tmp_path / 'm'}"])
  config = resolve(options.view_as(StorageOptions), "run1")
  p = beam.Pipeline(options=options)
  build(p, config, "run1", str(tmp_path / "spill"))
  impulses = _impulses(p)
  assert len(impulses) == 2, impulses
  assert any(name.endswith("SharedImpulse") for name in impulses)
  assert any("WriteRowsLocal" in name and "DoOnce" in name
             for name in impulses)
