"""Client for Flow-GRPO's GenEval reward server (``yifan123/reward-server``, ``app_geneval.py``).

The reward servers the PyTorch peers run (Flow-GRPO and the trainers built on it) speak pickle:

  POST {url}      body: pickle of {"images": [JPEG bytes, ...],
                                   "meta_datas": [GenEval record {"tag", "include", "prompt", ...}],
                                   "only_strict": bool}
  200 reply       pickle of {"scores": [float], "rewards": [float], "strict_rewards": [float],
                             "group_rewards": {tag: [float]}, "group_strict_rewards": {tag: [float]}}
  500 reply       the server's traceback as text

``scores`` is Flow-GRPO's dense reward (the mean over include clauses of 1 - |count - found| / count,
the colour terms and position 0/1), ``strict_rewards`` its exact-count 0/1 and ``rewards`` GenEval's
own 0/1 (computed only when ``only_strict`` is False; with it True the server sends zeros). The
group fields repeat a tag's values and put -10 in the rows of other tags; they are checked but not
used.

A reply is never given to ``pickle.loads``: ``loads_plain`` unpickles with an ``Unpickler`` whose
``find_class`` refuses every global, so no constructor, function or ``__reduce__`` payload can run;
only dict / list / tuple / str / bytes / int / float / bool / None come back (a walk of the result
refuses anything else, e.g. sets), and the chosen field must be a list of ``len(images)`` finite
real numbers. Transport, retries and deadlines are ``RemoteReward``'s (a 500 is retried as the
peers' clients do; its text is not unpickled).
"""

from __future__ import annotations

import io
import json
import pickle
from typing import Any, Sequence

import numpy as np
from PIL import Image

from htgrpo_jax.rewards.registry import REWARDS
from htgrpo_jax.rewards.remote import RemoteReward, RemoteRewardError

# The fields of the server's reply that hold one number per image.
SCORE_FIELDS = ("scores", "strict_rewards", "rewards")
_PLAIN = (dict, list, tuple, str, bytes, int, float, bool, type(None))
# Protocol 4 (Python 3.4+): the peers' servers run older Pythons than ours.
PICKLE_PROTOCOL = 4


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle that asks for a global (a class or function: code to run) or holds a non-plain type."""


class _PlainUnpickler(pickle.Unpickler):
  """An unpickler that resolves no global: every GLOBAL / STACK_GLOBAL / EXT opcode ends here."""

  def find_class(self, module: str, name: str):
    raise UnsafePickleError(
        f"the pickle asks for the global {module}.{name}; refused (only plain "
        "dict / list / str / bytes / int / float / bool / None data is accepted)"
    )

  def persistent_load(self, pid: Any):
    raise UnsafePickleError("the pickle holds a persistent id; refused")


def loads_plain(data: bytes) -> Any:
  """``pickle.loads`` for untrusted bytes: plain data only, nothing executed.

  Raises:
    UnsafePickleError: a global (any class or callable, e.g. ``os.system`` in a ``__reduce__``), a
      persistent id, or a non-plain object (a set, bytearray) in the result.
    pickle.UnpicklingError: malformed or truncated data ("malformed pickle (...)").
  """
  try:
    obj = _PlainUnpickler(io.BytesIO(data)).load()
  except UnsafePickleError:
    raise
  except Exception as e:  # UnpicklingError, EOFError, ValueError, ... of a malformed stream
    raise pickle.UnpicklingError(f"malformed pickle ({type(e).__name__}: {e})"[:300]) from None
  stack = [obj]
  while stack:  # iterative: a deeply nested reply cannot exhaust the recursion limit
    x = stack.pop()
    if type(x) not in _PLAIN:
      raise UnsafePickleError(
          f"the pickle holds a {type(x).__name__}; only plain dict / list / "
          "tuple / str / bytes / int / float / bool / None are accepted"
      )
    if isinstance(x, dict):
      stack.extend(x.keys())
      stack.extend(x.values())
    elif isinstance(x, (list, tuple)):
      stack.extend(x)
  return obj


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
  """uint8[H, W, 3] -> JPEG bytes (what the peers' clients send; GenEval's server opens JPEG only)."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8), "RGB").save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def _record(v: Any) -> Any:
  """A prompt's metadata as the plain dict the server reads (JSON text is decoded)."""
  if hasattr(v, "to_json"):
    v = v.to_json()
  if isinstance(v, (str, bytes)):
    v = json.loads(v)
  return v


class FlowGRPOGenEval(RemoteReward):
  """A ``RewardFn`` asking a Flow-GRPO GenEval reward server (pickle protocol, module docstring).

  Args:
    url: the server (``http://gpu-host:18085``; its only route is ``/``).
    name: reward name used in errors.
    field: which reply list is the reward: 'scores' (dense, Flow-GRPO's RL reward), 'strict_rewards'
      (exact counts 0/1) or 'rewards' (GenEval's 0/1; needs ``only_strict=False``).
    only_strict: sent to the server: True skips GenEval's own (non-strict) check, which RL does
      not need.
    jpeg_quality: of the images sent (PIL's JPEG encoder).
    metadata_key: the ``**metadata`` list holding each image's GenEval record (a dict or its JSON).
    timeout, max_retries, backoff, max_reply_bytes: as ``RemoteReward``.
  """

  content_type = "application/octet-stream"

  def __init__(
      self,
      url: str,
      name: str = "flowgrpo_geneval",
      field: str = "scores",
      only_strict: bool = True,
      jpeg_quality: int = 95,
      metadata_key: str = "meta",
      timeout: float = 120.0,
      max_retries: int = 3,
      backoff: float = 1.0,
      max_reply_bytes: int = 16 << 20,
  ):
    super().__init__(
        url,
        name=name,
        timeout=timeout,
        max_retries=max_retries,
        backoff=backoff,
        metadata_keys=(metadata_key,),
        max_reply_bytes=max_reply_bytes,
    )
    if field not in SCORE_FIELDS:
      raise ValueError(f"reward {name!r}: field={field!r} must be one of {SCORE_FIELDS}")
    if not isinstance(only_strict, bool):
      raise ValueError(f"reward {name!r}: only_strict={only_strict!r} must be True or False")
    if field == "rewards" and only_strict:
      raise ValueError(
          f"reward {name!r}: field='rewards' (GenEval's own 0/1) needs only_strict=False; "
          "with only_strict=True the server answers zeros there"
      )
    if isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100:
      raise ValueError(f"reward {name!r}: jpeg_quality={jpeg_quality!r} must be an int in [1, 100]")
    self.field, self.only_strict, self.jpeg_quality = field, only_strict, jpeg_quality
    self.metadata_key = metadata_key

  def _request_body(self, prompts: Sequence[str], images: np.ndarray, metadata: dict[str, list[Any]]) -> bytes:
    records = []
    for i, v in enumerate(metadata[self.metadata_key]):
      try:
        rec = _record(v)
      except ValueError as e:
        raise ValueError(f"reward {self.name!r}: metadata {self.metadata_key!r}[{i}] is not JSON ({e})") from None
      if not (isinstance(rec, dict) and isinstance(rec.get("tag"), str) and isinstance(rec.get("include"), list)):
        raise ValueError(
            f"reward {self.name!r}: metadata {self.metadata_key!r}[{i}] must be a GenEval "
            f"record with a 'tag' string and an 'include' list, got {str(rec)[:200]}"
        )
      records.append({"prompt": str(prompts[i]), **rec})
    return pickle.dumps(
        {
            "images": [encode_jpeg(im, self.jpeg_quality) for im in images],
            "meta_datas": records,
            "only_strict": self.only_strict,
        },
        protocol=PICKLE_PROTOCOL,
    )

  def _scores(self, raw: bytes, n: int) -> np.ndarray:
    try:
      reply = loads_plain(raw)
    except pickle.UnpicklingError as e:
      raise self._error(f"reply refused: {e}") from None
    if not isinstance(reply, dict):
      raise self._error(f"reply must be a dict, got {type(reply).__name__}")
    missing = [f for f in SCORE_FIELDS if f not in reply]
    if self.field in missing:
      raise self._error(f"reply has no {self.field!r} field (fields: {sorted(map(str, reply))[:10]})")
    out = None
    for f in SCORE_FIELDS:  # every per-image list the server sent must be well formed
      if f not in reply:
        continue
      vals = reply[f]
      if not isinstance(vals, list) or len(vals) != n:
        got = f"{len(vals)} entries" if isinstance(vals, list) else type(vals).__name__
        raise self._error(f"reply field {f!r} must be a list of {n} numbers (one per image), got {got}")
      arr = np.empty(n, np.float64)
      for i, v in enumerate(vals):
        # bool is an int subclass and would pass as 0/1; a string would convert under float().
        if isinstance(v, bool) or not isinstance(v, (int, float)):
          raise self._error(f"reply field {f!r}[{i}] is {v!r}, not a number"[:300])
        try:
          arr[i] = float(v)
        except OverflowError:
          raise self._error(f"reply field {f!r}[{i}] does not fit a float") from None
      bad = np.flatnonzero(~np.isfinite(arr))
      if bad.size:
        raise self._error(f"reply field {f!r} has non-finite values at {bad[:8].tolist()}")
      if f == self.field:
        out = arr
    for f in ("group_rewards", "group_strict_rewards"):
      if f in reply and not isinstance(reply[f], dict):
        raise self._error(f"reply field {f!r} must be a dict of per-tag lists, got " f"{type(reply[f]).__name__}")
    return out


@REWARDS.register("flowgrpo_geneval")
def build_flowgrpo_geneval(
    url: str,
    name: str = "flowgrpo_geneval",
    field: str = "scores",
    only_strict: bool = True,
    jpeg_quality: int = 95,
    timeout: float = 120.0,
    max_retries: int = 3,
    backoff: float = 1.0,
) -> FlowGRPOGenEval:
  """Flow-GRPO's GenEval server (``python app_geneval.py`` of ``yifan123/reward-server``)."""
  return FlowGRPOGenEval(
      url,
      name=name,
      field=field,
      only_strict=only_strict,
      jpeg_quality=jpeg_quality,
      timeout=timeout,
      max_retries=max_retries,
      backoff=backoff,
  )


__all__ = ["FlowGRPOGenEval", "RemoteRewardError", "UnsafePickleError", "encode_jpeg", "loads_plain"]
