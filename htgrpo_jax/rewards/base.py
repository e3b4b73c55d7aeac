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

__all__ = ["RewardFn", "check_images", "validate_rewards", "weighted"]


def check_images(name: str, prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
  """Validates a reward's inputs; returns images as uint8[B, H, W, 3].

  Raises:
    ValueError naming the reward when images are not uint8[B, H, W, 3] or B != len(prompts).
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"reward {name!r}: images must be uint8[B, H, W, 3], got "
                     f"{images.dtype}{list(images.shape)}")
  if isinstance(prompts, str) or len(prompts) != images.shape[0]:
    raise ValueError(f"reward {name!r}: {images.shape[0]} images but "
                     f"{'a bare string' if isinstance(prompts, str) else len(prompts)} prompts")
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
    raise ValueError(f"reward {name!r}: non-finite scores at indices {np.flatnonzero(bad)[:8].tolist()}"
                     f" ({s[bad][:4].tolist()})")
  return s.astype(np.float32)


def weighted(**rewards: tuple[Callable[..., Any], float]) -> Callable[..., np.ndarray]:
  """Sum of rewards with weights: ``weighted(shapes=(fn, 1.0), clip=(fn2, 0.5))``.

  Each component is validated under its own name; the combined callable also exposes
  ``components(prompts, images, **metadata) -> {name: float32[B]}`` for logging.
  """
  if not rewards:
    raise ValueError("weighted(): needs at least one name=(fn, weight)")
  for name, spec in rewards.items():
    if not (isinstance(spec, tuple) and len(spec) == 2 and callable(spec[0])):
      raise ValueError(f"weighted(): reward {name!r} must be (callable, weight), got {spec!r}")
    w = spec[1]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w):
      raise ValueError(f"weighted(): reward {name!r} has weight {w!r}; expected a finite number")

  def components(prompts: Sequence[str], images: np.ndarray, **metadata: Any
                 ) -> Mapping[str, np.ndarray]:
    images = check_images("weighted", prompts, images)
    return {n: validate_rewards(n, fn(prompts, images, **metadata), len(prompts))
            for n, (fn, _) in rewards.items()}

  def combined(prompts: Sequence[str], images: np.ndarray, **metadata: Any) -> np.ndarray:
    parts = components(prompts, images, **metadata)
    total = sum(np.float32(rewards[n][1]) * v for n, v in parts.items())
    return np.asarray(total, np.float32)

  combined.components = components
  return combined
