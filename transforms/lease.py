"""One run at a time per collection: a lease in the bucket.

A run holds Runs/<collection>/lease.json while it lasts: created only if
it does not exist (a generation precondition on Cloud Storage, an
exclusive create on a local disk), naming the run id, host, process and
start time, renewed every third of the lease time, and released when the
run ends. A run killed outright leaves it behind; it expires one lease
time after its last renewal, and the next run takes it over (atomically:
of two runs that find it expired, one gets it). --plan and pipeline.verify
write nothing and take no lease.
"""

import datetime
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Dict, Optional

from transforms.keys import join_uri
from transforms.records import rfc3339_utc

DEFAULT_LEASE_SECONDS = 600
LEASE_NAME = "lease.json"


class CollectionBusy(RuntimeError):
  """Another run holds the collection's lease; the message says which."""

  def __init__(self, holder: Dict[str, Any]):
    super().__init__(
        f"collection busy: run {holder.get('run_id')} on "
        f"{holder.get('host')} (pid {holder.get('pid')}) holds it since "
        f"{holder.get('started')}, lease renewed {holder.get('renewed')}, "
        f"expires {holder.get('expires')}")
    self.holder = holder


def _now() -> datetime.datetime:
  return datetime.datetime.now(datetime.timezone.utc)


def _parse(moment: str) -> datetime.datetime:
  return datetime.datetime.fromisoformat(moment.replace("Z", "+00:00"))


class _LocalStore:
  """The lease file on a local disk."""

  def __init__(self, path: str):
    self.path = path

  def create(self, body: bytes) -> bool:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(body)
    return True

  def read(self) -> Optional[Dict[str, Any]]:
    try:
      with open(self.path, "rb") as f:
        return json.loads(f.read() or b"{}")
    except FileNotFoundError:
      return None
    except ValueError:
      return {}   # being written: taken as not expired yet

  def replace(self, holder: Dict[str, Any], body: bytes) -> bool:
    """Overwrites the lease if it still is `holder`'s."""
    if self.read() != holder:
      return False
    tmp = f"{self.path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
      f.write(body)
    os.replace(tmp, self.path)
    return True

  def remove(self, holder: Dict[str, Any], ours: bool = False) -> bool:
    """Removes the lease if it still is `holder`'s: renamed away first, so
    that of two runs removing an expired lease, one does."""
    aside = f"{self.path}.{os.getpid()}.{time.monotonic_ns()}.old"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return False
    try:
      with open(aside, "rb") as f:
        taken = json.loads(f.read() or b"{}")
      if taken != holder:   # another's, made meanwhile: put it back
        os.rename(aside, self.path)
        return False
      return True
    finally:
      if os.path.exists(aside):
        os.unlink(aside)


class _GcsStore:
  """The lease object on Cloud Storage, by generation preconditions."""

  def __init__(self, uri: str, client):
    from transforms.gcs import blob_for
    self.blob = blob_for(client, uri)
    self.generation: Optional[int] = None        # of the lease we hold
    self._read_generation: Optional[int] = None  # of the one last read

  def create(self, body: bytes) -> bool:
    from google.api_core.exceptions import PreconditionFailed
    try:
      self.blob.upload_from_string(body, if_generation_match=0,
                                   content_type="application/json")
    except PreconditionFailed:
      return False
    self.generation = self.blob.generation
    return True

  def read(self) -> Optional[Dict[str, Any]]:
    from google.api_core.exceptions import NotFound
    try:
      data = self.blob.download_as_bytes()
    except NotFound:
      return None
    self._read_generation = self.blob.generation
    try:
      return json.loads(data or b"{}")
    except ValueError:
      return {}

  def replace(self, holder: Dict[str, Any], body: bytes) -> bool:
    from google.api_core.exceptions import PreconditionFailed
    try:
      self.blob.upload_from_string(body, if_generation_match=self.generation,
                                   content_type="application/json")
    except PreconditionFailed:
      return False
    self.generation = self.blob.generation
    return True

  def remove(self, holder: Dict[str, Any], ours: bool = False) -> bool:
    """Removes the lease if it still is the version we hold (ours) or
    the one last read (an expired one being taken over)."""
    from google.api_core.exceptions import NotFound, PreconditionFailed
    generation = self.generation if ours else self._read_generation
    try:
      self.blob.delete(if_generation_match=generation)
    except (NotFound, PreconditionFailed):
      return False
    return True


class Lease:
  """The collection's lease for one run: `with Lease(...):` holds it."""

  def __init__(self, bucket: str, collection: str, run_id: str,
               seconds: float = DEFAULT_LEASE_SECONDS, gcs_client=None):
    self.uri = join_uri(bucket, f"Runs/{collection}/{LEASE_NAME}")
    self.run_id = run_id
    self.seconds = seconds
    if bucket.startswith("gs://"):
      from transforms.gcs import storage_client
      self.store = _GcsStore(self.uri, gcs_client or storage_client())
    else:
      self.store = _LocalStore(self.uri)
    self.started = rfc3339_utc(_now())
    self.holder: Optional[Dict[str, Any]] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def _body(self) -> Dict[str, Any]:
    now = _now()
    return {"run_id": self.run_id, "host": socket.gethostname(),
            "pid": os.getpid(), "started": self.started,
            "renewed": rfc3339_utc(now),
            "expires": rfc3339_utc(now + datetime.timedelta(
                seconds=self.seconds))}

  def try_acquire(self) -> Optional[Dict[str, Any]]:
    """Takes the lease, or returns its holder's facts when another run
    holds it. An expired lease is taken over."""
    for _ in range(3):
      body = self._body()
      if self.store.create(json.dumps(body).encode()):
        self.holder = body
        return None
      held = self.store.read()
      if held is None:
        continue   # released meanwhile: try again
      expires = held.get("expires")
      if expires and _parse(expires) < _now():
        logging.warning("Taking over the lease of run %s, expired %s (the "
                        "run was killed)", held.get("run_id"), expires)
        self.store.remove(held)
        continue
      return held
    return self.store.read() or {}

  def acquire(self, wait: bool = False, poll_s: float = 5.0) -> None:
    """Takes the lease; raises CollectionBusy when another run holds it,
    or with wait, waits until it can be taken."""
    while True:
      held = self.try_acquire()
      if held is None:
        break
      if not wait:
        raise CollectionBusy(held)
      logging.warning("%s; waiting", CollectionBusy(held))
      until = (_parse(held["expires"]) - _now()).total_seconds() if held.get(
          "expires") else poll_s
      time.sleep(min(poll_s, max(0.2, until + 0.1)))
    self._thread = threading.Thread(target=self._renew, daemon=True,
                                    name="lease")
    self._thread.start()

  def _renew(self) -> None:
    while not self._stop.wait(self.seconds / 3):
      body = self._body()
      if self.store.replace(self.holder, json.dumps(body).encode()):
        self.holder = body
      else:
        logging.error("The lease of collection run %s was lost (taken over "
                      "after it expired?): another run may be writing",
                      self.run_id)
        return

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self.holder is not None:
      self.store.remove(self.holder, ours=True)
      self.holder = None
