"""pipeline/beam_tuning.py memoizes three of Beam's construction costs; these
fail loudly when a Beam upgrade changes what it relies on."""
import apache_beam as beam
from apache_beam.options.pipeline_options import (DirectOptions,
                                                  PipelineOptions,
                                                  StandardOptions)
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import core, userstate
from apache_beam.transforms.userstate import BagStateSpec
from apache_beam.typehints import decorators

from pipeline import beam_tuning


class _Stateful(beam.DoFn):
  BAG = BagStateSpec("bag", beam.coders.StrUtf8Coder())

  def process(self, element, bag=beam.DoFn.StateParam(BAG)):
    yield element


def test_dofn_specs_are_memoized_and_equal_to_beams():
  beam_tuning.apply()
  beam_tuning.apply()   # idempotent: wrapped once
  assert hasattr(userstate.get_dofn_specs, "original")
  assert not hasattr(userstate.get_dofn_specs.original, "original")
  dofn = _Stateful()
  first = userstate.get_dofn_specs(dofn)
  assert first == userstate.get_dofn_specs.original(dofn)
  assert first[0] == {_Stateful.BAG} and first[1] == set()
  first[0].clear()   # a caller's change does not reach the next caller
  assert userstate.get_dofn_specs(dofn)[0] == {_Stateful.BAG}
  assert userstate.is_stateful_dofn(dofn)
  # Beam still routes its own checks through the module's function.
  assert userstate.is_stateful_dofn(beam.DoFn()) is False


def test_options_views_are_shared_per_object_and_class():
  beam_tuning.apply()
  options = PipelineOptions(["--direct_num_workers=3"])
  view = options.view_as(DirectOptions)
  assert options.view_as(DirectOptions) is view
  assert view.direct_num_workers == 3
  view.direct_running_mode = "in_memory"
  assert options.view_as(DirectOptions).direct_running_mode == "in_memory"
  assert options.get_all_options()["direct_running_mode"] == "in_memory"
  other = PipelineOptions(["--runner=FnApiRunner"])
  assert other.view_as(StandardOptions).runner == "FnApiRunner"
  assert options.view_as(StandardOptions).runner is None


class _Plain(beam.DoFn):

  def process(self, element, prefix="p"):
    yield prefix + element


def test_signatures_are_memoized_and_equal_to_beams():
  """Functions and methods bound to anything share one signature per
  function; other callables are answered by Beam's own function."""
  beam_tuning.apply()
  memoized = decorators.get_signature
  assert hasattr(memoized, "original")
  assert core.get_signature is memoized
  original = memoized.original
  first, second = _Plain(), _Plain()
  assert memoized(first.process) == original(first.process)
  assert memoized(first.process) is memoized(second.process)
  assert list(memoized(first.process).parameters) == ["element", "prefix"]
  assert list(memoized(_Plain.process).parameters) == [
      "self", "element", "prefix"]
  assert memoized(str.upper) == original(str.upper)
  assert memoized(int) == original(int)
  # What Beam derives from them is unchanged.
  assert core.get_function_arguments(first, "process") == (
      ["element", "prefix"], ["p"])
  with beam.Pipeline() as p:
    out = (p | beam.Create(["a", "b"]) | beam.ParDo(_Plain())
           | beam.Map(lambda s, suffix="!": s + suffix))
    assert_that(out, equal_to(["pa!", "pb!"]))
