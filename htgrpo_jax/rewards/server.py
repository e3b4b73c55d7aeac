"""Serves rewards over HTTP in the project's JSON protocol (``rewards/remote.py`` is the client).

  POST /<name>   {"prompts": [...], "images": [base64 PNG, ...], "metadata": {key: [...]}}
                 -> {"scores": [float, ...]}       (one call scores one batch)
  GET  /health   -> {"status": "ok", "rewards": [...], "requests": {name: n}, "images": {name: n}}

Any ``RewardFn`` can be served; ``registered_rewards`` builds them by name from the reward registry
(``rewards.registry``: ``'NAME=KIND[,OPTION=VALUE...]'`` per endpoint), ``shapeeval_rewards`` gives
the ShapeEval verifier's two modes (``dense`` for RL, ``strict`` for evaluation). One POST is one
batch: the reward sees all its images in one call. Scores are validated with the reward's name before
they leave (count, finiteness), so a broken reward fails loudly on the server too. A bad request
is answered 400 with the reason; a batch the reward rejects (ValueError: e.g. a prompt outside its
grammar) 422, not retried by the client; any other failure of the reward 500 (retried).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from htgrpo_jax.rewards.base import validate_rewards
from htgrpo_jax.rewards.remote import decode_png

MAX_REQUEST_BYTES = 256 << 20


DEFAULT_SERVE = ("dense=shapeeval,mode=dense", "strict=shapeeval,mode=strict")


def parse_serve_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
  """``'NAME=KIND[,OPTION=VALUE...]'`` -> (endpoint name, registered kind, options).

  Values are read as JSON where they parse (numbers, true/false, lists) and kept as text otherwise:
  ``'clip=clipscore,checkpoint=/ckpt/clip,scale=2.5'``.

  Raises:
    ValueError: naming the spec when it is not of that form.
  """
  head, *opts = [s.strip() for s in str(spec).split(",")]
  name, sep, kind = head.partition("=")
  if not sep or not name.strip() or not kind.strip():
    raise ValueError(f"--serve={spec!r}: expected NAME=KIND[,OPTION=VALUE...], e.g. " "'dense=shapeeval,mode=dense'")
  options: dict[str, Any] = {}
  for o in opts:
    k, sep, v = o.partition("=")
    if not sep or not k.strip():
      raise ValueError(f"--serve={spec!r}: option {o!r} is not OPTION=VALUE")
    try:
      options[k.strip()] = json.loads(v)
    except ValueError:
      options[k.strip()] = v
  return name.strip(), kind.strip(), options


def registered_rewards(
    specs: Sequence[str], defaults: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, Callable[..., np.ndarray]]:
  """``{endpoint name: reward}`` built from the registry (``parse_serve_spec`` per spec).

  Args:
    specs: ``'NAME=KIND[,OPTION=VALUE...]'`` strings; names must be unique.
    defaults: per kind, options used where a spec does not set them (e.g. the ShapeEval canvas).

  Raises:
    ValueError: a malformed spec, a repeated name, an unknown kind or option (named).
  """
  from htgrpo_jax.rewards.registry import build_reward

  out: dict[str, Callable[..., np.ndarray]] = {}
  for spec in specs:
    name, kind, options = parse_serve_spec(spec)
    if name in out:
      raise ValueError(f"--serve={spec!r}: endpoint name {name!r} is served twice")
    options = {**dict((defaults or {}).get(kind, {})), **options}
    out[name] = build_reward(kind, options, key=f"--serve {name}", name=name)
  return out


def shapeeval_rewards(canvas: int = 32, patch: int = 4, snap: bool = True) -> dict[str, Callable[..., np.ndarray]]:
  """{'dense': ..., 'strict': ...}: the ShapeEval verifier of a world."""
  return registered_rewards(DEFAULT_SERVE, {"shapeeval": dict(canvas=canvas, patch=patch, snap=snap)})


def make_server(
    rewards: Mapping[str, Callable[..., np.ndarray]], host: str = "127.0.0.1", port: int = 0
) -> ThreadingHTTPServer:
  """An HTTP server (not yet serving: call ``serve_forever``) for ``{path name: reward}``.

  ``server.server_address`` holds the bound (host, port); port 0 picks a free one.
  """
  if not rewards:
    raise ValueError("make_server: no rewards to serve")
  bad = [n for n in rewards if not n or "/" in n or n == "health"]
  if bad:
    raise ValueError(f"make_server: reward names {bad} cannot be URL paths")
  lock = threading.Lock()
  stats: dict[str, dict[str, int]] = {"requests": {n: 0 for n in rewards}, "images": {n: 0 for n in rewards}}

  class Handler(BaseHTTPRequestHandler):

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: the trainer owns the console
      pass

    def _reply(self, code: int, payload: dict[str, Any]) -> None:
      body = json.dumps(payload).encode()
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def do_GET(self):
      if self.path.rstrip("/") != "/health":
        return self._reply(404, {"error": f"GET {self.path}: only /health"})
      with lock:
        snapshot = json.loads(json.dumps(stats))
      self._reply(200, {"status": "ok", "rewards": sorted(rewards), **snapshot})

    def do_POST(self):
      name = self.path.strip("/").split("?")[0]
      if name not in rewards:
        return self._reply(404, {"error": f"no reward {name!r}; served: {sorted(rewards)}"})
      try:
        size = int(self.headers.get("Content-Length", "-1"))
        if not 0 <= size <= MAX_REQUEST_BYTES:
          raise ValueError(f"Content-Length {size} outside [0, {MAX_REQUEST_BYTES}]")
        req = json.loads(self.rfile.read(size))
        prompts, images = req["prompts"], req["images"]
        if not isinstance(prompts, list) or not isinstance(images, list) or len(prompts) != len(images):
          raise ValueError("'prompts' and 'images' must be lists of one length")
        metadata = req.get("metadata") or {}
        if not isinstance(metadata, dict) or any(len(v) != len(prompts) for v in metadata.values()):
          raise ValueError("'metadata' must map keys to lists as long as 'prompts'")
        batch = np.stack([decode_png(s) for s in images]) if images else np.zeros((0, 1, 1, 3), np.uint8)
      except (KeyError, TypeError, ValueError) as e:
        return self._reply(400, {"error": f"bad request: {e}"})
      try:
        scores = validate_rewards(name, rewards[name](prompts, batch, **metadata), len(prompts))
      except ValueError as e:  # the request's content is at fault (a prompt the reward rejects)
        return self._reply(422, {"error": f"reward {name!r} rejected the batch: {e}"})
      except Exception as e:  # the reward's own failure, reported to the caller by name
        return self._reply(500, {"error": f"reward {name!r} failed: {type(e).__name__}: {e}"})
      with lock:
        stats["requests"][name] += 1
        stats["images"][name] += len(prompts)
      self._reply(200, {"scores": [float(x) for x in scores]})

  return ThreadingHTTPServer((host, port), Handler)
