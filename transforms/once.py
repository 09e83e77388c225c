"""A few values known when the graph is built (a listing's roots, where
the current rows are, the report's first fact), from one Impulse per
pipeline.

beam.Create starts from an Impulse of its own, and the local runner runs
each Impulse's stage on its own, one after another: ~20 ms each, eight of
them in a run. The consumers of one PCollection are fused into one stage,
so every `Once` of a pipeline starts from the same Impulse and they all
run in one bundle. Unlike beam.Create, `Once` never reshuffles its
values: a transform that wants them spread over workers says so.
"""
import weakref
from typing import Any, Iterable

import apache_beam as beam
from apache_beam import pvalue

# pipeline -> its shared Impulse (created by the first Once applied to it).
_impulses: "weakref.WeakKeyDictionary[beam.Pipeline, pvalue.PCollection]" = (
    weakref.WeakKeyDictionary())


def shared_impulse(pipeline: beam.Pipeline) -> pvalue.PCollection:
  impulse = _impulses.get(pipeline)
  if impulse is None:
    impulse = _impulses[pipeline] = pipeline | "SharedImpulse" >> (
        beam.Impulse())
  return impulse


class Once(beam.PTransform):
  """PBegin -> these values, once each (nothing for no values)."""

  def __init__(self, values: Iterable[Any]):
    super().__init__()
    self.values = list(values)

  def expand(self, pbegin):
    values = self.values
    return shared_impulse(pbegin.pipeline) | "Values" >> beam.FlatMap(
        lambda _: values)
