"""Cloud client libraries that Beam imports with itself but that a local
run uses on one path only, loaded at their first use instead.

`import apache_beam` imports the Pub/Sub client (never used here), the
Dataflow API client (used to submit a job) and the BigQuery client (used
only with --bigquery_table): ~0.13 s of the ~0.8 s a local run's driver
spends importing before anything can start, on every run. Their modules
are created by the standard library's LazyLoader (the recipe in the
importlib documentation): the import binds a module whose code runs at
the first attribute looked up on it.

Only in the driver of a local run, before Beam is imported: Python 3.11's
LazyLoader is not thread-safe, and there the first use of each is on the
main thread (BigQuery's in the checks before the graph runs). The warm
worker process defers only the two that no worker ever uses (Pub/Sub's
and the Dataflow API's: never loaded, so never loaded by two threads at
once); BigQuery's, which workers use from their threads, it imports as
usual. Dataflow launches and tests import as usual.

A run of a few files runs its bundles in the driver, where Beam's state
cache weighs each side input with objsize, which looks into the globals
of every loaded module, and so loaded each deferred module (~0.13 s):
objsize now passes over modules not loaded yet (they hold nothing a
value could share).

Beam imports the MongoDB driver and its BSON library (its MongoDB
connector, ~0.12 s) and Arrow (its Arrow type conversions, ~0.05 s) when
they are installed, as optional extras; this pipeline uses none of them,
so local runs (the driver and the warm worker process) leave them out,
and Beam imports as it does without them.
"""

import contextlib
import gc
import importlib.abc
import importlib.util
import logging
import sys
from typing import Iterable, Iterator, Optional

NEVER_USED_BY_WORKERS = ("google.cloud.pubsub", "google.cloud.dataflow")
DEFERRED = NEVER_USED_BY_WORKERS + ("google.cloud.bigquery",)
UNUSED = ("pymongo", "bson", "pyarrow", "pyarrow_hotfix")


class _DeferredFinder(importlib.abc.MetaPathFinder):
  """Finds the named modules as the other finders would, and wraps their
  loader in LazyLoader."""

  def __init__(self, names: Iterable[str]):
    self.names = frozenset(names)

  def find_spec(self, fullname: str, path, target=None
                ) -> Optional[importlib.machinery.ModuleSpec]:
    if fullname not in self.names:
      return None
    for finder in sys.meta_path:
      if finder is self or not hasattr(finder, "find_spec"):
        continue
      spec = finder.find_spec(fullname, path, target)
      if spec is not None:
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
          spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec
    return None


def defer_cloud_clients(names: Iterable[str] = DEFERRED) -> None:
  """Called once, before Beam is imported. No-op for modules already
  imported."""
  if not any(isinstance(f, _DeferredFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _DeferredFinder(
        n for n in names if n not in sys.modules))
    _weigh_loaded_modules_only()


def leave_out_unused(names: Iterable[str] = UNUSED) -> None:
  """Called before Beam is imported: `import name` raises ImportError for
  each of these, as if not installed. No-op for modules already imported.
  Beam's connector would warn that it found no BSON library: not news to
  anyone running this pipeline."""
  for name in names:
    sys.modules.setdefault(name, None)
  logging.getLogger("apache_beam.io.mongodbio").setLevel(logging.ERROR)


def _weigh_loaded_modules_only() -> None:
  # pylint: disable=import-outside-toplevel,protected-access
  from objsize import traverse
  lazy = importlib.util._LazyModule

  def _iter_modules_globals():
    for module in list(sys.modules.values()):
      if not isinstance(module, lazy):
        try:
          yield vars(module)
        except TypeError:
          pass

  traverse._iter_modules_globals = _iter_modules_globals


@contextlib.contextmanager
def without_collection() -> Iterator[None]:
  """For the imports of a command line: Python's cyclic collector, run
  every few hundred new objects, scanned the growing heap again and again
  while Beam and the pipeline imported (~0.2 s of ~0.9 s). What imports
  make lives as long as the process: it is frozen out of later
  collections instead, and collection resumes for the run."""
  gc.disable()
  try:
    yield
  finally:
    gc.freeze()
    gc.enable()
