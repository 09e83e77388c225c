"""A small HTTP reverse proxy on loopback, in front of an emulator: it counts
what clients ask for (method, path, Range, bytes returned) and can inject
faults (a fraction of requests answered 503 or cut off) to prove that
clients retry. For tests only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import http.client
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, List, Optional
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate",
               "proxy-authorization", "te", "trailers", "transfer-encoding",
               "upgrade"}


@dataclasses.dataclass
class Exchange:
  method: str
  path: str
  range: Optional[str]
  status: int
  response_bytes: int
  fault: Optional[str] = None


@dataclasses.dataclass
class Faults:
  """What fraction of requests to fail, and how; seeded, so repeatable."""
  unavailable: float = 0.0      # answered 503
  cut: float = 0.0              # connection closed without an answer
  seed: int = 0
  only_methods: tuple = ()      # e.g. ("GET",); empty: every method
  forbid: str = ""              # requests whose path has this: 403, always


class Proxy:
  def __init__(self, upstream: str, faults: Optional[Faults] = None):
    self.upstream = urlsplit(upstream)
    self.faults = faults or Faults()
    self.exchanges: List[Exchange] = []
    self._random = random.Random(self.faults.seed)
    self._lock = threading.Lock()

  def _fault(self, method: str, path: str) -> Optional[str]:
    f = self.faults
    if f.forbid and f.forbid in path:
      return "403"
    if f.only_methods and method not in f.only_methods:
      return None
    with self._lock:
      draw = self._random.random()
    if draw < f.unavailable:
      return "503"
    if draw < f.unavailable + f.cut:
      return "cut"
    return None

  def record(self, exchange: Exchange) -> None:
    with self._lock:
      self.exchanges.append(exchange)


def _handler(proxy: Proxy):
  class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
      pass

    def _forward(self):
      length = int(self.headers.get("Content-Length") or 0)
      body = self.rfile.read(length) if length else None
      fault = proxy._fault(self.command, self.path)  # pylint: disable=protected-access
      if fault == "cut":
        proxy.record(Exchange(self.command, self.path,
                              self.headers.get("Range"), 0, 0, "cut"))
        self.close_connection = True
        self.connection.shutdown(2)
        return
      if fault in ("503", "403"):
        code = int(fault)
        payload = b'{"error": {"code": %d, "message": "injected"}}' % code
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        proxy.record(Exchange(self.command, self.path,
                              self.headers.get("Range"), code, 0, fault))
        return
      conn = http.client.HTTPConnection(proxy.upstream.hostname,
                                        proxy.upstream.port, timeout=120)
      headers = {k: v for k, v in self.headers.items()
                 if k.lower() not in _HOP_BY_HOP and k.lower() != "host"}
      headers["Host"] = proxy.upstream.netloc
      conn.request(self.command, self.path, body=body, headers=headers)
      resp = conn.getresponse()
      data = resp.read()
      self.send_response(resp.status, resp.reason)
      for k, v in resp.getheaders():
        if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
          self.send_header(k, v)
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(data)
      conn.close()
      proxy.record(Exchange(self.command, self.path, self.headers.get("Range"),
                            resp.status, len(data)))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

  return Handler


@contextlib.contextmanager
def proxy_to(upstream: str, faults: Optional[Faults] = None) -> Iterator[Proxy]:
  """Runs a proxy to `upstream` on a free loopback port until the block ends;
  the Proxy's `url` attribute is its base URL."""
  proxy = Proxy(upstream, faults)
  server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
  server.daemon_threads = True
  proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield proxy
  finally:
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)
