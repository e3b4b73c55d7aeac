"""Group-relative advantages (GRPO), flat or hierarchical (M sketches x G / M paints per prompt)."""

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


def hierarchical_advantages(
    rewards: jax.Array, group_size: int, num_sketches: int, eps: float = 1e-5, ddof: int = 1
) -> tuple[jax.Array, jax.Array]:
  """Sketch- and paint-level advantages of groups of M sketches x G / M paints.

  Each prompt's G rows are its M sketches in order, each sketch's G / M paints contiguous. A sketch's
  value is the mean reward of its paints; the sketch-level advantage compares it with the prompt's M
  sketches, the paint-level advantage compares an image with the other paints of its sketch (both
  ``group_advantages``: mean-centred, divided by std + eps).

  Args:
    rewards: float32[B], B a multiple of ``group_size``.
    group_size: G.
    num_sketches: M >= 2 dividing G with G / M >= 2 (M sketches of at least two paints each).
    eps, ddof: as ``group_advantages``.

  Returns:
    (sketch_adv float32[B], paint_adv float32[B]): row i's sketch-level advantage (equal over the
    paints of one sketch) and its paint-level advantage.
  """
  b = rewards.shape[0]
  if b % group_size:
    raise ValueError(f"rewards: batch {b} is not a multiple of group_size={group_size}")
  if num_sketches < 2 or group_size % num_sketches or group_size // num_sketches < 2:
    raise ValueError(
        f"num_sketches={num_sketches} must be >= 2 and divide group_size={group_size} into "
        "sketches of at least 2 paints"
    )
  paints = group_size // num_sketches
  r = rewards.astype(jnp.float32)
  sketch_value = r.reshape(b // paints, paints).mean(axis=1)  # [B / paints]
  sketch_adv = jnp.repeat(group_advantages(sketch_value, num_sketches, eps, ddof), paints)
  return sketch_adv, group_advantages(r, paints, eps, ddof)


def token_advantages(rewards: jax.Array, commit_step: jax.Array, config) -> jax.Array:
  """Per-token advantage before credit, float32[B, N].

  ``config.num_sketches == 1``: the image's group advantage on every token. M >= 2 (rollouts that
  branch M sketches per prompt into G / M paints each): the sketch-level advantage on tokens committed
  in the sketch phase (``commit_step < config.sketch_steps``, the tokens the sketch's paints share)
  and the paint-level advantage on the others (``hierarchical_advantages``).

  Args:
    rewards: float32[B].
    commit_step: int32[B, N] sampler step that fixed each token.
    config: an ``HTGRPOConfig`` (group_size, num_sketches, sketch_steps, adv_eps, adv_std_ddof).
  """
  if config.num_sketches == 1:
    adv = group_advantages(rewards, config.group_size, config.adv_eps, config.adv_std_ddof)
    return jnp.broadcast_to(adv[:, None], commit_step.shape)
  sketch_adv, paint_adv = hierarchical_advantages(
      rewards, config.group_size, config.num_sketches, config.adv_eps, config.adv_std_ddof
  )
  return jnp.where(commit_step < config.sketch_steps, sketch_adv[:, None], paint_adv[:, None])
