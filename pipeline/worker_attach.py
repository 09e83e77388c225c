"""The command the local runner starts for each worker: hands the worker's
environment to the warm worker process (pipeline/worker_zygote.py) and
waits for it, exiting with its exit code; or, when no warm worker answers,
becomes an ordinary Beam worker.

Runs as `python -I -S worker_attach.py SOCKET [WAIT_S]`, standard library
only, so it starts in milliseconds instead of the ~2 s of importing Beam.
"""
import json
import os
import socket
import sys

COLD_WORKER = ["-m", "apache_beam.runners.worker.sdk_worker_main"]
# The warm process answers once its imports are done (~2 s); one silent for
# a minute is stuck, and Beam's own worker starts instead.
START_WAIT_S = 60.0


def attach(socket_path: str, wait_s: float = START_WAIT_S) -> int:
  try:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(wait_s)
    conn.connect(socket_path)
    conn.sendall(json.dumps(dict(os.environ)).encode() + b"\n")
    started = conn.recv(1)
    conn.settimeout(None)   # the worker runs as long as the pipeline
  except OSError:           # also socket.timeout
    started = b""
  if started != b"S":
    # Nothing was started for this environment: start Beam's own worker,
    # exactly what the runner would have run (site packages loaded again).
    os.execv(sys.executable, [sys.executable, *COLD_WORKER])
  status = conn.recv(1)
  return status[0] if status else 1  # closed without a status: it died


if __name__ == "__main__":
  sys.exit(attach(sys.argv[1], *map(float, sys.argv[2:3])))
