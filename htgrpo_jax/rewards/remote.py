"""Client for a reward model served over HTTP (e.g. a GPU box running a GenEval detector).

Wire format (JSON both ways, never pickle):
  POST {url}
  request  {"prompts": [str, ...], "images": [base64 PNG, ...], "metadata": {key: [json, ...]}}
  response {"scores": [number, ...]}

Each attempt has one overall deadline of ``timeout`` s (connect, send, headers and body together:
a server that drip-feeds bytes cannot hold a call longer) and a reply-size cap. Connection errors,
timeouts, broken HTTP (bad status line, short body) and 5xx/429 answers are retried up to
``max_retries`` times with exponential backoff; 4xx answers, oversized or malformed replies and
scores that are not real numbers raise at once (retrying cannot fix them). Redirects are followed
only to the same scheme, host and port, and only with 307/308 (which keep the POST); anything else
is an error naming the location. Every error is a ``RemoteRewardError`` naming the reward and URL.

Plain ``http.client``: no proxy variables are read (reward servers sit next to the trainer).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time
import urllib.parse
from typing import Any, Sequence

import numpy as np
from PIL import Image

from htgrpo_jax.rewards.base import check_images, validate_rewards
from htgrpo_jax.rewards.registry import REWARDS

_MAX_REDIRECTS = 3


class RemoteRewardError(ValueError):
  """A reward server call that failed; the message names the reward and the URL."""


class _Transient(Exception):
  """An attempt that may succeed if retried (its message says what happened)."""


def encode_png(image: np.ndarray) -> str:
  """uint8[H, W, 3] -> base64 PNG text."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8), "RGB").save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str) -> np.ndarray:
  """base64 PNG text -> uint8[H, W, 3]."""
  with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as im:
    return np.asarray(im.convert("RGB"), np.uint8)


def _jsonable(v: Any) -> Any:
  if hasattr(v, "to_json"):
    return json.loads(v.to_json())
  if isinstance(v, np.generic):
    return v.item()
  return v


def _origin(parts: urllib.parse.SplitResult) -> tuple[str, str | None, int]:
  return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


class RemoteReward:
  """A ``RewardFn`` that asks an HTTP server for the scores.

  The transport (deadlines, retries, redirects, size caps) is shared by every protocol; a protocol
  is ``content_type``, ``_request_body`` and ``_scores`` (``flowgrpo.FlowGRPOGenEval`` is the other).

  Args:
    url: endpoint accepting the POST described in the module docstring.
    name: reward name used in errors and by ``weighted``.
    timeout: overall seconds per attempt (the whole request and reply).
    max_retries: retries after the first attempt on transient failures.
    backoff: first retry delay (s), doubled each retry.
    metadata_keys: which ``**metadata`` lists to forward (others are dropped).
    max_reply_bytes: replies larger than this are refused.
  """

  content_type = "application/json"

  def __init__(
      self,
      url: str,
      name: str = "remote",
      timeout: float = 30.0,
      max_retries: int = 3,
      backoff: float = 0.5,
      metadata_keys: Sequence[str] = (),
      max_reply_bytes: int = 16 << 20,
  ):
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
      raise ValueError(f"reward {name!r}: url {url!r} must start with http:// or https://")
    if not urllib.parse.urlsplit(url).hostname:
      raise ValueError(f"reward {name!r}: url {url!r} has no host")
    if (
        isinstance(max_retries, bool)
        or not isinstance(max_retries, int)
        or max_retries < 0
        or not timeout > 0
        or not backoff >= 0
        or not max_reply_bytes > 0
        or not np.isfinite(timeout)
        or not np.isfinite(backoff)
    ):
      raise ValueError(
          f"reward {name!r}: need timeout > 0, an int max_retries >= 0, backoff >= 0 "
          f"(finite) and max_reply_bytes > 0; got timeout={timeout!r}, "
          f"max_retries={max_retries!r}, backoff={backoff!r}, "
          f"max_reply_bytes={max_reply_bytes!r}"
      )
    self.url, self.name, self.timeout = url, name, float(timeout)
    self.max_retries, self.backoff, self.metadata_keys = max_retries, float(backoff), tuple(metadata_keys)
    self.max_reply_bytes = int(max_reply_bytes)

  def _error(self, what: str) -> RemoteRewardError:
    return RemoteRewardError(f"reward {self.name!r} at {self.url}: {what}")

  # ----------------------------------------------------------------------------------------------
  # One HTTP exchange

  def _exchange(self, url: str, body: bytes, deadline: float) -> tuple[int, str | None, bytes]:
    """POSTs ``body`` to ``url`` and reads the whole reply before ``deadline`` (monotonic s).

    Returns:
      (status, Location header, body bytes).

    Raises:
      _Transient: connection/timeout/HTTP-protocol failures.
      RemoteRewardError: a reply over ``max_reply_bytes``.
    """
    parts = urllib.parse.urlsplit(url)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      raise _Transient(f"deadline of {self.timeout:g} s exceeded")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=remaining)
    expired = threading.Event()

    def abort():
      # Socket timeouts are per read; this bounds the whole exchange.
      expired.set()
      sock = conn.sock
      if sock is not None:
        try:
          sock.shutdown(socket.SHUT_RDWR)
        except OSError:
          pass

    watchdog = threading.Timer(remaining, abort)
    watchdog.daemon = True
    watchdog.start()
    try:
      path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
      conn.request(
          "POST",
          path,
          body=body,
          headers={"Content-Type": self.content_type, "Content-Length": str(len(body)), "Connection": "close"},
      )
      resp = conn.getresponse()
      declared = resp.getheader("Content-Length")
      if declared is not None and declared.strip().isdigit() and int(declared) > self.max_reply_bytes:
        raise self._error(
            f"reply of {int(declared)} bytes is larger than " f"{self.max_reply_bytes} bytes (max_reply_bytes)"
        )
      chunks, total = [], 0
      while True:
        if conn.sock is not None:
          conn.sock.settimeout(max(deadline - time.monotonic(), 1e-3))
        chunk = resp.read1(65536)
        if not chunk:
          break
        total += len(chunk)
        if total > self.max_reply_bytes:
          raise self._error(f"reply is larger than {self.max_reply_bytes} bytes (max_reply_bytes)")
        chunks.append(chunk)
      if expired.is_set():
        raise _Transient(f"deadline of {self.timeout:g} s exceeded")
      if declared is not None and declared.strip().isdigit() and total < int(declared):
        # read1 returns b"" on a closed connection instead of raising like read().
        raise http.client.IncompleteRead(b"".join(chunks), int(declared) - total)
      return resp.status, resp.getheader("Location"), b"".join(chunks)
    except (http.client.HTTPException, OSError) as e:  # OSError: refused, reset, timeout, TLS
      if expired.is_set() or isinstance(e, TimeoutError):
        raise _Transient(f"deadline of {self.timeout:g} s exceeded ({type(e).__name__})") from None
      raise _Transient(f"{type(e).__name__}: {e!r}"[:300]) from None
    finally:
      watchdog.cancel()
      conn.close()

  def _attempt(self, body: bytes) -> bytes:
    """One attempt (following same-origin 307/308 redirects) -> the 200 reply body."""
    deadline = time.monotonic() + self.timeout
    url = self.url
    for _ in range(_MAX_REDIRECTS + 1):
      status, location, raw = self._exchange(url, body, deadline)
      if status in (301, 302, 303, 307, 308):
        target = urllib.parse.urljoin(url, location or "")
        same = _origin(urllib.parse.urlsplit(target)) == _origin(urllib.parse.urlsplit(url))
        if not (location and same and status in (307, 308)):
          raise self._error(
              f"server answered a redirect (HTTP {status}) to {target!r}; only "
              "307/308 redirects to the same host and port are followed (others "
              "would leave the host or turn the POST into a GET): point the URL at "
              "the final endpoint"
          )
        url = target
        continue
      if status == 429 or status >= 500:
        raise _Transient(f"HTTP {status}")
      if status != 200:
        raise self._error(f"server answered HTTP {status}: {raw[:200]!r}")
      return raw
    raise self._error(f"more than {_MAX_REDIRECTS} redirects")

  def _post(self, body: bytes) -> bytes:
    delay, last = self.backoff, None
    for attempt in range(self.max_retries + 1):
      if attempt:
        time.sleep(delay)
        delay *= 2
      try:
        return self._attempt(body)
      except _Transient as e:
        last = str(e)
    raise self._error(f"failed after {self.max_retries + 1} attempts (last: {last})")

  # ----------------------------------------------------------------------------------------------

  def _scores(self, raw: bytes, n: int) -> np.ndarray:
    """The reply body -> float64[n] after checking it is JSON with a list of real numbers."""
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise self._error(f"reply is not UTF-8 ({e}): {raw[:200]!r}") from None
    try:
      reply = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError; ints past the digit limit
      raise self._error(f"reply is not JSON ({type(e).__name__}: {str(e)[:100]}): " f"{raw[:200]!r}") from None
    if not isinstance(reply, dict) or "scores" not in reply:
      raise self._error(f"reply has no 'scores' field: {text[:200]}")
    scores = reply["scores"]
    if not isinstance(scores, list):
      raise self._error(f"'scores' must be a list of numbers, got {type(scores).__name__}")
    for i, v in enumerate(scores):
      # bool is an int subclass and "0.5" converts under np.asarray: neither is a score.
      if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise self._error(f"'scores' must be a list of numbers; element {i} is {v!r}"[:300])
    out = np.empty(len(scores), np.float64)
    for i, v in enumerate(scores):
      try:
        out[i] = float(v)
      except OverflowError:
        raise self._error(f"score {i} does not fit a float ({str(v)[:40]}...)") from None
    return out

  def _metadata(self, n: int, metadata: dict[str, Any]) -> dict[str, list[Any]]:
    """The forwarded ``metadata_keys`` lists, each checked to hold ``n`` entries."""
    meta = {}
    for k in self.metadata_keys:
      if k not in metadata:
        raise ValueError(f"reward {self.name!r}: metadata key {k!r} was not passed")
      if len(metadata[k]) != n:
        raise ValueError(f"reward {self.name!r}: metadata {k!r} has {len(metadata[k])} entries " f"for {n} prompts")
      meta[k] = list(metadata[k])
    return meta

  def _request_body(self, prompts: Sequence[str], images: np.ndarray, metadata: dict[str, list[Any]]) -> bytes:
    """The POST body of one batch (the project's JSON protocol)."""
    meta = {k: [_jsonable(v) for v in vs] for k, vs in metadata.items()}
    return json.dumps(
        {"prompts": list(prompts), "images": [encode_png(im) for im in images], "metadata": meta}
    ).encode()

  def __call__(self, prompts: Sequence[str], images: np.ndarray, **metadata: Any) -> np.ndarray:
    images = check_images(self.name, prompts, images)
    body = self._request_body(prompts, images, self._metadata(len(prompts), metadata))
    scores = self._scores(self._post(body), len(prompts))
    return validate_rewards(self.name, scores, len(prompts))


@REWARDS.register("remote")
def build_remote(
    url: str,
    name: str = "remote",
    timeout: float = 30.0,
    max_retries: int = 3,
    backoff: float = 0.5,
    metadata_keys: Sequence[str] = ("meta",),
) -> RemoteReward:
  """A server speaking the project's JSON protocol (``launch/reward_server.py``); ``meta`` (the
  prompts' metadata JSON) is forwarded by default."""
  return RemoteReward(
      url, name=name, timeout=timeout, max_retries=max_retries, backoff=backoff, metadata_keys=tuple(metadata_keys)
  )
