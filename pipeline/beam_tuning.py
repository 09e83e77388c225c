"""Three of Beam's construction costs, memoized for a local run.

Building and translating this pipeline's graph asked Beam ~700 times for
the state and timer specs of its ~60 DoFns (userstate.get_dofn_specs
inspects the signature of every method of the DoFn, ~30 per call), and
~1,000 times for a view of the pipeline options (each view parses every
flag again with a fresh argparse parser): together ~0.3 s of a run's
fixed cost. Building the graph and its bundle processors still asked
for ~7,700 signatures of a few hundred functions (inspect.signature: a
20-file run made 1.38 M Python calls with them, 0.99 M without). Each answer is fixed once the object exists, so
it is kept per DoFn, per options object and per function. This depends
on Beam's internals: kept here, applied by local runs (driver and warm
workers) only, and tests/test_beam_tuning.py fails when a Beam upgrade
changes what it relies on.
"""
import threading
import types
import weakref

from apache_beam.options import pipeline_options
from apache_beam.transforms import core, ptransform, userstate
from apache_beam.transforms import util as transforms_util
from apache_beam.typehints import decorators

# The modules that bound Beam's get_signature by name at import.
_SIGNATURE_USERS = (decorators, core, ptransform, transforms_util)

_lock = threading.Lock()
_applied = False


def apply() -> None:
  """Memoizes get_dofn_specs (per DoFn) and PipelineOptions.view_as (per
  options object and view class). Idempotent."""
  global _applied  # pylint: disable=global-statement
  with _lock:
    if _applied:
      return
    _memoize_dofn_specs()
    _memoize_views()
    _memoize_signatures()
    _applied = True


def _memoize_dofn_specs() -> None:
  original = userstate.get_dofn_specs
  specs = {}   # id(dofn) -> (dofn, its specs); the DoFn kept alive with it

  def get_dofn_specs(dofn):
    found = specs.get(id(dofn))
    if found is None or found[0] is not dofn:
      found = specs[id(dofn)] = (dofn, original(dofn))
    # Fresh sets: callers may change what they get.
    state, timers = found[1]
    return set(state), set(timers)

  get_dofn_specs.original = original
  userstate.get_dofn_specs = get_dofn_specs


def _memoize_views() -> None:
  options_class = pipeline_options.PipelineOptions
  original = options_class.view_as
  views = weakref.WeakKeyDictionary()   # options -> {view class: view}

  def view_as(self, cls):
    try:
      mine = views.setdefault(self, {})
    except TypeError:   # not weak-referenceable: as Beam does it
      return original(self, cls)
    view = mine.get(cls)
    if view is None:
      view = mine[cls] = original(self, cls)
    return view

  view_as.original = original
  options_class.view_as = view_as


def _memoize_signatures() -> None:
  original = decorators.get_signature
  # function -> {bound: signature}: a plain function's signature, and that
  # of a method bound to anything (the first parameter dropped).
  signatures = weakref.WeakKeyDictionary()

  def get_signature(func):
    if isinstance(func, types.FunctionType):
      function, bound = func, False
    elif (isinstance(func, types.MethodType)
          and isinstance(func.__func__, types.FunctionType)):
      function, bound = func.__func__, True
    else:   # builtins, types, partials, callable objects: as Beam does it
      return original(func)
    mine = signatures.setdefault(function, {})
    signature = mine.get(bound)
    if signature is None:   # Signature objects are immutable: shared
      signature = mine[bound] = original(func)
    return signature

  get_signature.original = original
  for module in _SIGNATURE_USERS:
    module.get_signature = get_signature
