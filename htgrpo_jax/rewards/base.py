"""The reward protocol (``contracts.RewardFn``, re-exported here) and its combinators.

A reward is any callable

    reward(prompts: list[str], images: uint8[B, H, W, 3], **metadata) -> float32[B]

Metadata keyword arguments are per-prompt lists (e.g. ``meta=[PromptMeta, ...]`` for ShapeEval);
a reward ignores keys it does not know (hence ``**metadata``). Host-side numpy, never jitted:
rewards run between the sampler and the update.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from htgrpo_jax.contracts import RewardFn

__all__ = [
    "RewardError",
    "RewardFn",
    "WeightedReward",
    "as_weighted",
    "check_images",
    "group_normalize",
    "validate_rewards",
    "weighted",
]


def check_images(name: str, prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
  """Validates a reward's inputs; returns images as uint8[B, H, W, 3].

  Raises:
    ValueError naming the reward when images are not uint8[B, H, W, 3] or B != len(prompts).
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"reward {name!r}: images must be uint8[B, H, W, 3], got " f"{images.dtype}{list(images.shape)}")
  if isinstance(prompts, str) or len(prompts) != images.shape[0]:
    raise ValueError(
        f"reward {name!r}: {images.shape[0]} images but "
        f"{'a bare string' if isinstance(prompts, str) else len(prompts)} prompts"
    )
  return images


def validate_rewards(name: str, scores: Any, batch: int) -> np.ndarray:
  """Checks one reward's output.

  Args:
    name: the reward's name, used in every error.
    scores: what the reward returned; must be float[B] (any float dtype), finite.
    batch: B.

  Returns:
    float32[B].

  Raises:
    ValueError naming the reward on a wrong count/shape, a non-float dtype, NaN or inf.
  """
  s = np.asarray(scores)
  if s.shape != (batch,):
    raise ValueError(f"reward {name!r}: returned shape {s.shape}, expected ({batch},)")
  if not np.issubdtype(s.dtype, np.floating):
    raise ValueError(f"reward {name!r}: returned dtype {s.dtype}, expected a float dtype")
  bad = ~np.isfinite(s)
  if bad.any():
    raise ValueError(
        f"reward {name!r}: non-finite scores at indices {np.flatnonzero(bad)[:8].tolist()}" f" ({s[bad][:4].tolist()})"
    )
  return s.astype(np.float32)


class RewardError(RuntimeError):
  """A reward component that failed; the message names it (and the rows it was scoring)."""


def named_error(name: str, e: Exception, rows: str = "") -> Exception:
  """``e`` if its message already names the reward ``name`` (``validate_rewards``, the remote
  clients), else a ``RewardError`` naming it, to raise ``from e``."""
  if f"reward {name!r}" in str(e):
    return e
  return RewardError(f"reward {name!r} failed{' on rows ' + rows if rows else ''}: " f"{type(e).__name__}: {e}"[:2000])


def group_normalize(x: np.ndarray, group_size: int, eps: float = 1e-6) -> np.ndarray:
  """(x - mean_G x) / (std_G x + eps) within each group of ``group_size`` contiguous rows.

  The population std (ddof 0), as Flow-GRPO's per-prompt tracker and Tunix normalise: a group of
  equal scores becomes zeros. Computed in float64.

  Args:
    x: float[B], B a multiple of ``group_size`` (each prompt's G images contiguous).

  Returns:
    float32[B].
  """
  x = np.asarray(x, np.float64)
  if group_size < 1 or x.shape[0] % group_size:
    raise ValueError(f"group_normalize: batch {x.shape[0]} is not a multiple of group_size={group_size}")
  g = x.reshape(-1, group_size)
  return ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + eps)).reshape(-1).astype(np.float32)


class WeightedReward:
  """``sum_c weight_c * r_c``, each component ``r_c`` optionally normalised within its prompt group.

  Scoring and combining are separate so a batch can be scored in chunks (``rollouts``):
  ``components`` is per image (any rows), ``combine`` needs whole groups. Calling it does both.

  Args:
    components: ``{name: (reward, weight, group_norm)}``; names are used in errors and logs
      (``reward/<name>``).
    group_size: G, the contiguous rows of one prompt; required when any ``group_norm`` is True.
    eps: of ``group_normalize``.
  """

  def __init__(
      self,
      components: Mapping[str, tuple[Callable[..., Any], float, bool]],
      group_size: int | None = None,
      eps: float = 1e-6,
  ):
    if not components:
      raise ValueError("WeightedReward: needs at least one component")
    for name, spec in components.items():
      if not (isinstance(spec, tuple) and len(spec) == 3 and callable(spec[0])):
        raise ValueError(f"reward {name!r}: must be (callable, weight, group_norm), got {spec!r}")
      w, norm = spec[1], spec[2]
      if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w):
        raise ValueError(f"reward {name!r} has weight {w!r}; expected a finite number")
      if not isinstance(norm, bool):
        raise ValueError(f"reward {name!r} has group_norm={norm!r}; expected True or False")
    if any(spec[2] for spec in components.values()) and not (isinstance(group_size, int) and group_size >= 1):
      raise ValueError(f"WeightedReward: group_norm needs the group size, got group_size={group_size!r}")
    self.specs = dict(components)
    self.group_size, self.eps = group_size, eps
    self.name = "+".join(self.specs)

  def components(
      self, prompts: Sequence[str], images: np.ndarray, *, rows: str = "", **metadata: Any
  ) -> dict[str, np.ndarray]:
    """``{name: float32[B]}`` raw validated scores of each component (before normalisation).

    Raises:
      the component's error when it names the reward, else ``RewardError`` naming it (``rows``,
      e.g. ``'32:64'``, says which part of a chunked batch it was scoring).
    """
    images = check_images(self.name, prompts, images)
    out = {}
    for n, (fn, _, _) in self.specs.items():
      try:
        out[n] = validate_rewards(n, fn(prompts, images, **metadata), len(prompts))
      except Exception as e:  # noqa: BLE001 (re-raised, naming the component)
        raise named_error(n, e, rows) from e
    return out

  def combine(self, parts: Mapping[str, np.ndarray]) -> np.ndarray:
    """float32[B]: the weighted sum of ``components``' output for whole groups."""
    total = None
    for n, (_, w, norm) in self.specs.items():
      x = group_normalize(parts[n], self.group_size, self.eps) if norm else parts[n]
      term = np.float32(w) * np.asarray(x, np.float32)
      total = term if total is None else total + term
    return np.asarray(total, np.float32)

  def __call__(self, prompts: Sequence[str], images: np.ndarray, **metadata: Any) -> np.ndarray:
    return self.combine(self.components(prompts, images, **metadata))


def as_weighted(reward: Callable[..., Any]) -> WeightedReward:
  """``reward`` itself when it is a ``WeightedReward``, else a one-component sum with weight 1 and
  no normalisation (whose ``combine`` returns the reward's scores unchanged)."""
  if isinstance(reward, WeightedReward):
    return reward
  name = getattr(reward, "name", getattr(reward, "__name__", "reward"))
  return WeightedReward({str(name): (reward, 1.0, False)})


def weighted(**rewards: tuple[Callable[..., Any], float]) -> WeightedReward:
  """Sum of rewards with weights: ``weighted(shapes=(fn, 1.0), clip=(fn2, 0.5))``.

  Each component is validated under its own name; ``components(prompts, images, **metadata) ->
  {name: float32[B]}`` gives them for logging. ``WeightedReward`` adds per-group normalisation.
  """
  if not rewards:
    raise ValueError("weighted(): needs at least one name=(fn, weight)")
  for name, spec in rewards.items():
    if not (isinstance(spec, tuple) and len(spec) == 2 and callable(spec[0])):
      raise ValueError(f"weighted(): reward {name!r} must be (callable, weight), got {spec!r}")
  return WeightedReward({n: (fn, w, False) for n, (fn, w) in rewards.items()})
