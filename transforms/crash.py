"""A test hook: kill this process at a named point, to prove that whatever
a killed run leaves is completed by the next one (the re-run and export
tests). Inert unless DICOM_STORAGE_CRASH_AT is set."""

import os
import signal


def crash_point(name: str) -> None:
  """DICOM_STORAGE_CRASH_AT=<name>:<n> kills this process with
  SIGKILL the n-th time it passes <name>, to prove re-runs recover from a
  run killed at that point. Inert unless the variable is set."""
  spec = os.environ.get("DICOM_STORAGE_CRASH_AT", "")
  if not spec.startswith(name + ":"):
    return
  crash_point.hits = getattr(crash_point, "hits", 0) + 1
  if crash_point.hits >= int(spec.split(":", 1)[1]):
    os.kill(os.getpid(), signal.SIGKILL)
