"""Client for a reward model served over HTTP (e.g. a GPU box running a GenEval detector).

Wire format (JSON both ways, never pickle):
  POST {url}
  request  {"prompts": [str, ...], "images": [base64 PNG, ...], "metadata": {key: [json, ...]}}
  response {"scores": [float, ...]}

Requests time out after ``timeout`` s; connection errors, timeouts and 5xx/429 answers are
retried up to ``max_retries`` times with exponential backoff; 4xx answers and malformed replies
raise at once (retrying cannot fix them). Every error names the reward.
"""
from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

import numpy as np
from PIL import Image

from htgrpo_jax.rewards.base import check_images, validate_rewards


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


class RemoteReward:
  """A ``RewardFn`` that asks an HTTP server for the scores.

  Args:
    url: endpoint accepting the POST described in the module docstring.
    name: reward name used in errors and by ``weighted``.
    timeout: seconds per request.
    max_retries: retries after the first attempt on transient failures.
    backoff: first retry delay (s), doubled each retry.
    metadata_keys: which ``**metadata`` lists to forward (others are dropped).
  """

  def __init__(self, url: str, name: str = "remote", timeout: float = 30.0, max_retries: int = 3,
               backoff: float = 0.5, metadata_keys: Sequence[str] = ()):
    if not url.startswith(("http://", "https://")):
      raise ValueError(f"reward {name!r}: url {url!r} must start with http:// or https://")
    if timeout <= 0 or max_retries < 0 or backoff < 0:
      raise ValueError(f"reward {name!r}: need timeout > 0, max_retries >= 0, backoff >= 0")
    self.url, self.name, self.timeout = url, name, timeout
    self.max_retries, self.backoff, self.metadata_keys = max_retries, backoff, tuple(metadata_keys)

  def _post(self, body: bytes) -> dict[str, Any]:
    delay, last = self.backoff, None
    for attempt in range(self.max_retries + 1):
      if attempt:
        time.sleep(delay)
        delay *= 2
      req = urllib.request.Request(self.url, data=body, method="POST",
                                   headers={"Content-Type": "application/json"})
      try:
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
          raw = resp.read()
      except urllib.error.HTTPError as e:
        if e.code == 429 or e.code >= 500:
          last = f"HTTP {e.code}"
          continue
        raise ValueError(f"reward {self.name!r}: server answered HTTP {e.code}: "
                         f"{e.read()[:200]!r}") from None
      except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        continue
      try:
        return json.loads(raw)
      except json.JSONDecodeError:
        raise ValueError(f"reward {self.name!r}: reply is not JSON: {raw[:200]!r}") from None
    raise ValueError(f"reward {self.name!r}: {self.url} failed after {self.max_retries + 1} "
                     f"attempts (last: {last})")

  def __call__(self, prompts: Sequence[str], images: np.ndarray, **metadata: Any) -> np.ndarray:
    images = check_images(self.name, prompts, images)
    meta = {}
    for k in self.metadata_keys:
      if k not in metadata:
        raise ValueError(f"reward {self.name!r}: metadata key {k!r} was not passed")
      if len(metadata[k]) != len(prompts):
        raise ValueError(f"reward {self.name!r}: metadata {k!r} has {len(metadata[k])} entries "
                         f"for {len(prompts)} prompts")
      meta[k] = [_jsonable(v) for v in metadata[k]]
    body = json.dumps({"prompts": list(prompts), "images": [encode_png(im) for im in images],
                       "metadata": meta}).encode()
    reply = self._post(body)
    if not isinstance(reply, dict) or "scores" not in reply:
      raise ValueError(f"reward {self.name!r}: reply has no 'scores' field: {str(reply)[:200]}")
    try:
      scores = np.asarray(reply["scores"], np.float64)
    except (TypeError, ValueError):
      raise ValueError(f"reward {self.name!r}: 'scores' is not a list of numbers") from None
    return validate_rewards(self.name, scores, len(prompts))
