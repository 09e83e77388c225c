"""pipeline/beam_tuning.py memoizes two of Beam's construction costs; these
fail loudly when a Beam upgrade changes what it relies on."""
import apache_beam as beam
from apache_beam.options.pipeline_options import (DirectOptions,
                                                  PipelineOptions,
                                                  StandardOptions)
from apache_beam.transforms import userstate
from apache_beam.transforms.userstate import BagStateSpec

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
