"""Group-relative advantages (GRPO)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def group_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-5, ddof: int = 1) -> jax.Array:
  """A_g = (r_g - mean_G r) / (std_G r + eps) per group of ``group_size`` contiguous rows.

  The std is the unbiased one (``ddof=1``) by default, as MaskGRPO (torch ``std``) and Tunix do;
  ``ddof=0`` gives the population std. A group whose rewards are all equal gets advantage 0.

  Args:
    rewards: float32[B], B a multiple of ``group_size``; each prompt's G images contiguous.
    group_size: G >= 2 (>= 1 with ``ddof=0``).
    eps: added to the std.
    ddof: delta degrees of freedom of the std.

  Returns:
    float32[B] advantages.
  """
  b = rewards.shape[0]
  if b % group_size:
    raise ValueError(f"rewards: batch {b} is not a multiple of group_size={group_size}")
  if group_size - ddof < 1:
    raise ValueError(f"group_size={group_size} must exceed ddof={ddof}")
  r = rewards.astype(jnp.float32).reshape(b // group_size, group_size)
  mean = r.mean(axis=1, keepdims=True)
  std = jnp.std(r, axis=1, ddof=ddof, keepdims=True)
  return ((r - mean) / (std + eps)).reshape(b)
