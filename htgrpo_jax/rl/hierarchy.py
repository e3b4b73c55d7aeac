"""Sketch vs paint: token partition, hierarchical credit, the stage schedule and per-stage update sets.

Everything has static shapes (selection by rank under a mask, never boolean indexing), so it jits and
shards; ranking ties are broken deterministically by the secondary key and then the token index.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from htgrpo_jax.contracts import Registry
from htgrpo_jax.rl.config import STAGE_GLOBAL, STAGE_REFINE, STAGE_STRUCT, HTGRPOConfig

_COUNT_TOL = 1e-3  # ceil(f * n) tolerant to float32 rounding of f * n (n <= a few thousand tokens)


def _rank(keys: tuple[jax.Array, ...]) -> jax.Array:
  """Rank (0 = first) of every token along the last axis under lexicographic order of ``keys``.

  ``keys`` lists sort keys from primary to secondary, all [B, N]; the token index is the final key.
  """
  idx = jnp.broadcast_to(jnp.arange(keys[0].shape[-1]), keys[0].shape)
  order = jnp.lexsort((idx,) + tuple(reversed(keys)), axis=-1)  # lexsort: last key is primary
  return jnp.argsort(order, axis=-1)  # inverse permutation


def sketch_steps(num_steps: int, sketch_fraction: float) -> int:
  """The sketch phase is sampler steps [0, ceil(sketch_fraction * T)), at least one step."""
  return max(1, math.ceil(sketch_fraction * num_steps - 1e-9))


# ``partition_mode`` -> the sort keys (primary first, all [B, N]) that order an image's candidates;
# each gets (not_cand int32: 0 on candidates, commit_step, ent: NaN-free entropy, key).
PARTITION_REGISTRY: Registry = Registry("partition mode")


@PARTITION_REGISTRY.register("entropy")
def _entropy_order(not_cand, commit_step, ent, key):
  return (not_cand, -ent)  # highest commit entropy first


@PARTITION_REGISTRY.register("step")
def _step_order(not_cand, commit_step, ent, key):
  return (not_cand, commit_step, -ent)  # earliest commit first, higher entropy breaking ties


@PARTITION_REGISTRY.register("random")
def _random_order(not_cand, commit_step, ent, key):
  return (not_cand, jax.random.uniform(key, commit_step.shape))  # ablation


def partition_tokens(
    commit_step: jax.Array,
    commit_entropy: jax.Array,
    *,
    num_steps: int,
    sketch_fraction: float,
    structure_ratio: float,
    mode: str = "entropy",
    key: jax.Array | None = None,
) -> jax.Array:
  """Structure set S of each image (True) vs refinement set R (False).

  Candidates are tokens committed in the sketch phase (``commit_step < ceil(sketch_fraction * T)``).
  S holds the first ``ceil(structure_ratio * N)`` candidates of each image (fewer when there are fewer
  candidates) under the mode's order: 'entropy' = highest commit entropy first; 'step' = earliest commit
  step first, higher entropy breaking ties; 'random' = uniformly at random (needs ``key``). Remaining ties
  go to the lower token index. NaN entropies rank last.

  Args:
    commit_step: int32[B, N] sampler step (0-based) that fixed each token.
    commit_entropy: float32[B, N] entropy (nats) of the distribution each token was drawn from.
    num_steps: T.
    sketch_fraction, structure_ratio: in (0, 1].
    mode: 'entropy' | 'step' | 'random'.
    key: PRNG key, required for mode='random'.

  Returns:
    bool[B, N], True on S.
  """
  order = PARTITION_REGISTRY.get(mode)
  if mode == "random" and key is None:
    raise ValueError("partition mode='random' needs a key")
  for name, v in (("sketch_fraction", sketch_fraction), ("structure_ratio", structure_ratio)):
    if not 0.0 < v <= 1.0:
      raise ValueError(f"partition {name}={v} must lie in (0, 1]")
  n = commit_step.shape[-1]
  n_struct = max(1, math.ceil(structure_ratio * n - 1e-9))
  cand = (commit_step >= 0) & (commit_step < sketch_steps(num_steps, sketch_fraction))
  not_cand = (~cand).astype(jnp.int32)  # candidates (0) sort first
  ent = jnp.where(jnp.isnan(commit_entropy), -jnp.inf, commit_entropy.astype(jnp.float32))
  rank = _rank(order(not_cand, commit_step, ent, key))
  return cand & (rank < n_struct)


def credit_weights(
    is_structure: jax.Array, *, structure_weight: float, refine_weight: float, normalize: bool = True
) -> jax.Array:
  """Per-token credit w: ``structure_weight`` on S, ``refine_weight`` on R.

  With ``normalize`` each image's weights are divided by their mean over its N tokens (an image whose
  weights are all 0 stays 0): ``credit_normalization='image'``. Each stage's loss being its own token
  mean, the struct and refine stages then carry w_S / mean(w) and w_R / mean(w) of the advantage;
  ``loss_set_credit`` normalises over an iteration's loss set instead ('stage').

  Args:
    is_structure: bool[B, N].

  Returns:
    float32[B, N].
  """
  w = jnp.where(is_structure, jnp.float32(structure_weight), jnp.float32(refine_weight))
  if normalize:
    m = w.mean(axis=-1, keepdims=True)
    w = w / jnp.where(m > 0, m, 1.0)
  return w


def loss_set_credit(weights: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Credit rescaled to mean 1 over each image's loss set (``credit_normalization='stage'``).

  Every iteration's loss is a token mean over its own loss set, so this is what keeps each stage's
  step size that of uniform credit. Images with an empty loss set (or zero weight on it) are left as
  they are; uniform weights come back exactly 1.

  Args:
    weights: float32[B, N] unnormalised credit (``credit_weights(..., normalize=False)``).
    loss_mask: bool[B, N] the iteration's loss set.

  Returns:
    float32[B, N].
  """
  m = loss_mask.astype(jnp.float32)
  mean = (weights * m).sum(axis=-1, keepdims=True) / jnp.maximum(m.sum(axis=-1, keepdims=True), 1.0)
  return weights / jnp.where(mean > 0, mean, 1.0)


def stage_schedule(n_global: int, n_struct: int, n_refine: int) -> tuple[int, ...]:
  """Static stage id per inner iteration: global, then struct, then refine (K entries)."""
  return (STAGE_GLOBAL,) * n_global + (STAGE_STRUCT,) * n_struct + (STAGE_REFINE,) * n_refine


def stage_of_iteration(k: int, n_global: int, n_struct: int, n_refine: int) -> int:
  """Stage id of inner iteration k (0-based)."""
  sched = stage_schedule(n_global, n_struct, n_refine)
  if not 0 <= k < len(sched):
    raise ValueError(f"iteration k={k} outside [0, K={len(sched)})")
  return sched[k]


# ``HTGRPOConfig.update_schedule`` -> ``config -> (fraction of iteration k for k < K)``.
UPDATE_SCHEDULE_REGISTRY: Registry = Registry("HTGRPOConfig.update_schedule")


@UPDATE_SCHEDULE_REGISTRY.register("constant")
def _constant_fractions(config: HTGRPOConfig) -> tuple[float, ...]:
  return (config.update_fraction,) * config.num_iterations


@UPDATE_SCHEDULE_REGISTRY.register("ramp")
def _ramp_fractions(config: HTGRPOConfig) -> tuple[float, ...]:
  k_total, m = config.num_iterations, config.min_mask_rate
  return tuple(min(m + (1.0 - m) * (k + 1) / k_total, 0.999) for k in range(k_total))


def update_fractions(config: HTGRPOConfig) -> tuple[float, ...]:
  """Static update-set fraction of each inner iteration k: constant, or MaskGRPO's ramp
  r_k = min(m + (1 - m)(k + 1)/K, 0.999)."""
  return UPDATE_SCHEDULE_REGISTRY.get(config.update_schedule)(config)


def stage_candidates(stage: int, is_structure: jax.Array) -> jax.Array:
  """Candidate set of a stage: all tokens (global), S (struct) or R (refine). bool[B, N]."""
  if stage == STAGE_GLOBAL:
    return jnp.ones_like(is_structure)
  if stage == STAGE_STRUCT:
    return is_structure
  if stage == STAGE_REFINE:
    return ~is_structure
  raise ValueError(f"stage={stage} must be 0 (global), 1 (struct) or 2 (refine)")


def sample_update_set(key: jax.Array, candidates: jax.Array, fraction: float) -> jax.Array:
  """A uniformly random subset of each image's candidates of size ceil(fraction * |candidates|).

  Args:
    key: PRNG key.
    candidates: bool[B, N].
    fraction: in (0, 1].

  Returns:
    bool[B, N], a subset of ``candidates`` (empty where an image has no candidates).
  """
  n_cand = candidates.sum(axis=-1, keepdims=True).astype(jnp.float32)
  count = jnp.ceil(jnp.float32(fraction) * n_cand - _COUNT_TOL)
  rank = _rank(((~candidates).astype(jnp.int32), jax.random.uniform(key, candidates.shape)))
  return candidates & (rank < count)
