"""HTTP servers on 127.0.0.1 for the reward-client tests: a quiet handler base and a threaded server
on a free port, shut down when the test is done."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from typing import Any, Iterator

from htgrpo_jax.rewards import remote


class Handler(http.server.BaseHTTPRequestHandler):
  """Base of the test servers: ``reply`` writes a status and a body; nothing is logged."""

  def reply(self, code: int, body: bytes = b"", content_type: str | None = None) -> None:
    self.send_response(code)
    if content_type:
      self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def reply_json(self, obj: Any) -> None:
    self.reply(200, json.dumps(obj).encode(), "application/json")

  def log_message(self, *args):
    pass


@contextlib.contextmanager
def serve(handler: type[Handler], **state: Any) -> Iterator[http.server.ThreadingHTTPServer]:
  """A ``ThreadingHTTPServer`` running ``handler``, with ``state`` set as attributes of the server
  (what the handler reads and records through ``self.server``)."""
  srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  for k, v in state.items():
    setattr(srv, k, v)
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  try:
    yield srv
  finally:
    srv.shutdown()
    srv.server_close()


def url(srv: http.server.HTTPServer, path: str = "") -> str:
  return f"http://127.0.0.1:{srv.server_address[1]}{path}"


class BrightnessReward(Handler):
  """A reward server: records every request as ``(path, body, images)`` in ``server.requests`` and
  scores an image by its mean brightness in [0, 1]."""

  def do_POST(self):  # noqa: N802 (http.server's naming)
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    images = [remote.decode_png(s) for s in body["images"]]
    self.server.requests.append((self.path, body, images))
    self.reply_json({"scores": [float(im.mean() / 255.0) for im in images]})
