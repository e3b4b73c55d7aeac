"""Importance-ratio estimators: the canvas each inner iteration scores, and the tokens that enter its loss.

For inner iteration k every estimator returns ``(canvas int32[B, N], loss_mask bool[B, N])``: the canvas
holds the rollout's codes where revealed and ``MASK`` elsewhere; ``loss_mask`` marks the tokens whose
log pi(token | prompt, canvas) enters the loss. All randomness of iteration k comes from
``key_k = fold_in(step_key, k)`` so the old, reference and current passes see the same canvas. The loss set
always lies inside the stage's candidate set (all tokens / S / R).

* ``htgrpo``: global and struct stages score an all-mask canvas (one forward gives log pi(x_i | prompt) for
  every i, independent of the unmasking order); the refine stage reveals S (``refine_context='structure'``)
  or nothing. Loss set: a random subset of the stage's candidates (``update_fractions``). With
  ``sketch_context='trajectory'`` global/struct iterations replay a recorded step group as ``trajectory``
  does (candidates: the stage's); ``refine_context='trajectory'`` replays a group among R's candidates
  on a canvas that also reveals S.
* ``random_remask`` (MaskGRPO): each candidate is masked i.i.d. with probability r_k (``update_fractions``;
  the ramp by default); the loss set is the masked tokens.
* ``trajectory`` (TraceGRPO): per image, a recorded step group s (of ``trajectory_group`` consecutive steps)
  is drawn uniformly among the groups that committed a candidate; canvas = tokens committed before group s,
  loss set = candidates committed in group s.
* ``uni`` (UniGRPO): per image a start ratio u ~ U(0, 1) drawn once per step; iteration k masks candidates
  i.i.d. with ratio u + (1 - u) k / (K - 1), rising to 1 at the last iteration.

Each estimator is an ``Estimator`` registered under its ``HTGRPOConfig.estimator`` name in
``ESTIMATOR_REGISTRY``; a new one registers here and adds its name to ``rl.config.ESTIMATORS`` (the
config validates against that tuple; ``tests/test_registry.py`` checks the two agree).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from htgrpo_jax.contracts import MASK, Registry
from htgrpo_jax.rl import hierarchy
from htgrpo_jax.rl.config import STAGE_REFINE, HTGRPOConfig

_UNI_START_SALT = 0x7FFF_FFF0  # fold_in salt of the per-step UniGRPO start ratio (never a valid k)


class Iteration(NamedTuple):
  """What an estimator sees of inner iteration k (all arrays [B, N]; keys derived from the step key)."""

  k: int  # static inner-iteration index, 0 <= k < K
  stage: int  # STAGE_GLOBAL / STAGE_STRUCT / STAGE_REFINE
  fraction: float  # the update-set fraction of iteration k (hierarchy.update_fractions)
  step_key: jax.Array
  k_sel: jax.Array  # key of the update-set draw
  k_mask: jax.Array  # key of the re-masking / replay-group draw
  candidates: jax.Array  # bool: the stage's candidate set (hierarchy.stage_candidates)
  image_tokens: jax.Array
  commit_step: jax.Array
  is_structure: jax.Array


class Estimator:
  """An importance-ratio estimator: the canvas and loss set of each inner iteration.

  ``canvas(config, it) -> (canvas int32[B, N], loss_mask bool[B, N])``.
  ``canvas_kind(config, stage)``: iterations whose kinds are equal score the same canvas (the old
  and reference passes then run once per kind); None (the default) draws a fresh canvas per
  iteration.
  """

  @staticmethod
  def canvas(config: HTGRPOConfig, it: Iteration) -> tuple[jax.Array, jax.Array]:
    raise NotImplementedError

  @staticmethod
  def canvas_kind(config: HTGRPOConfig, stage: int) -> str | None:
    return None

  @staticmethod
  def replays(config: HTGRPOConfig, stage: int) -> bool:
    """Whether the stage's iterations replay one step group per image (``replay_step_group``)."""
    return False


ESTIMATOR_REGISTRY: Registry[type[Estimator]] = Registry("HTGRPOConfig.estimator")


def _candidate_groups(config: HTGRPOConfig, candidates: jax.Array, commit_step: jax.Array):
  """(group int32[B, N] of each token's commit step, has bool[B, n_groups]: the group holds a candidate)."""
  g = config.trajectory_group
  n_groups = -(-config.num_sampler_steps // g)
  grp = jnp.clip(commit_step // g, 0, n_groups - 1)
  has = (jax.nn.one_hot(grp, n_groups, dtype=jnp.float32) * candidates[..., None]).sum(axis=1) > 0
  return grp, has


def replay_step_group(
    config: HTGRPOConfig, it: Iteration, reveal: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """TraceRL-style replay of one recorded step group per image (TraceGRPO's canvas and loss set).

  Sampler steps are merged into groups of ``trajectory_group`` consecutive steps; per image one group s
  is drawn uniformly (key ``it.k_mask``) among the groups that committed a candidate (``it.candidates``).
  The canvas reveals the tokens committed in groups before s, plus ``reveal`` where given; the loss set
  is ``sample_update_set(it.k_sel, candidates committed in s, it.fraction)``. An image without
  candidates gets an empty loss set.

  Args:
    config: supplies ``trajectory_group`` and ``num_sampler_steps``.
    it: the iteration (candidates, rollout record, keys, fraction).
    reveal: bool[B, N] tokens revealed whatever their group (refine: S), or None.

  Returns:
    (canvas int32[B, N], loss_mask bool[B, N]).
  """
  cand = it.candidates
  grp, has = _candidate_groups(config, cand, it.commit_step)
  scores = jnp.where(has, jax.random.gumbel(it.k_mask, has.shape), -jnp.inf)
  s = jnp.argmax(scores, axis=-1)[:, None]  # uniform over groups with candidates
  loss = hierarchy.sample_update_set(it.k_sel, cand & (grp == s), it.fraction)
  shown = grp < s if reveal is None else (grp < s) | reveal
  return jnp.where(shown, it.image_tokens, MASK), loss


@ESTIMATOR_REGISTRY.register("htgrpo")
class FullyMaskedEstimator(Estimator):
  """Global/struct stages: the all-mask canvas (``sketch_context='all_mask'``) or a replayed step group
  ('trajectory'); refine: S revealed ('structure'), nothing ('none'), or S plus a replayed R step group
  ('trajectory')."""

  @staticmethod
  def canvas_kind(config, stage):
    if stage == STAGE_REFINE:
      return {"structure": "refine", "none": "all_mask", "trajectory": None}[config.refine_context]
    return {"all_mask": "all_mask", "trajectory": None}[config.sketch_context]

  @staticmethod
  def replays(config, stage):
    return (config.refine_context if stage == STAGE_REFINE else config.sketch_context) == "trajectory"

  @staticmethod
  def canvas(config, it):
    if it.stage == STAGE_REFINE:
      if config.refine_context == "trajectory":
        return replay_step_group(config, it, reveal=it.is_structure)
    elif config.sketch_context == "trajectory":
      return replay_step_group(config, it)
    loss = hierarchy.sample_update_set(it.k_sel, it.candidates, it.fraction)
    if it.stage == STAGE_REFINE and config.refine_context == "structure":
      return jnp.where(it.is_structure, it.image_tokens, MASK), loss
    return jnp.full_like(it.image_tokens, MASK), loss


def _remask(it: Iteration, ratio: jax.Array) -> tuple[jax.Array, jax.Array]:
  masked = it.candidates & (jax.random.uniform(it.k_mask, it.image_tokens.shape) < ratio)
  return jnp.where(masked, MASK, it.image_tokens), masked


@ESTIMATOR_REGISTRY.register("random_remask")
class RandomRemaskEstimator(Estimator):
  """MaskGRPO: candidates re-masked i.i.d. with probability r_k; loss on the re-masked tokens."""

  @staticmethod
  def canvas(config, it):
    return _remask(it, jnp.float32(it.fraction))


@ESTIMATOR_REGISTRY.register("trajectory")
class TrajectoryEstimator(Estimator):
  """TraceGRPO: the recorded canvas before a sampled step group; loss on that group's commits."""

  @staticmethod
  def replays(config, stage):
    return True

  @staticmethod
  def canvas(config, it):
    return replay_step_group(config, it)


@ESTIMATOR_REGISTRY.register("uni")
class UniEstimator(Estimator):
  """UniGRPO: a per-image start ratio u ~ U(0, 1) per step, rising to 1 at the last iteration."""

  @staticmethod
  def canvas(config, it):
    u = jax.random.uniform(jax.random.fold_in(it.step_key, _UNI_START_SALT), (it.image_tokens.shape[0], 1))
    k_total = config.num_iterations
    ratio = u + (1.0 - u) * (it.k / (k_total - 1) if k_total > 1 else 1.0)
    return _remask(it, ratio)


def replay_weights(
    config: HTGRPOConfig, commit_step: jax.Array, is_structure: jax.Array, loss_masks: jax.Array
) -> jax.Array:
  """Per-image loss weights of each iteration, float32[K, B] (``HTGRPOConfig.replay_correction``).

  A replaying iteration draws one of the n_b step groups that hold a candidate of image b, so each
  candidate is in the loss with probability 1 / n_b. With the correction, image b's loss tokens weigh
  n_b x sum_j |L_j| / sum_j n_j |L_j| (|L_j| its loss-set size): proportional to n_b, so every candidate
  counts once in expectation, and mean 1 over the iteration's loss tokens, so the step size of the
  token-mean loss is unchanged. Other iterations, and every iteration without the correction, weigh 1.

  Args:
    commit_step: int32[B, N]; is_structure: bool[B, N]; loss_masks: bool[K, B, N] (``all_canvases``).
  """
  sched = hierarchy.stage_schedule(config.n_global, config.n_struct, config.n_refine)
  estimator = ESTIMATOR_REGISTRY.get(config.estimator)
  ones = jnp.ones(commit_step.shape[:1], jnp.float32)
  out = []
  for k, stage in enumerate(sched):
    if not (config.replay_correction and estimator.replays(config, stage)):
      out.append(ones)
      continue
    _, has = _candidate_groups(config, hierarchy.stage_candidates(stage, is_structure), commit_step)
    n = has.sum(axis=-1).astype(jnp.float32)
    size = loss_masks[k].sum(axis=-1).astype(jnp.float32)
    out.append(n * size.sum() / jnp.maximum((n * size).sum(), 1.0))
  return jnp.stack(out)


def canvas_groups(config: HTGRPOConfig) -> tuple[int, ...]:
  """Static index of the distinct canvas each iteration uses (numbered by first appearance).

  Iterations whose canvases the estimator makes identical share an index, so the old/reference passes run
  once per distinct canvas: for 'htgrpo' every global/struct iteration scores the same all-mask canvas and
  every refine iteration the same S-revealed canvas (two forwards instead of K). An iteration of kind None
  (other estimators; 'htgrpo' with a 'trajectory' context) draws its own canvas and gets its own index, so
  a mix (replayed sketch stages, shared S-revealed refine canvas) costs one forward per replayed
  iteration plus one per shared kind.
  """
  sched = hierarchy.stage_schedule(config.n_global, config.n_struct, config.n_refine)
  estimator = ESTIMATOR_REGISTRY.get(config.estimator)
  first, groups = {}, []
  for k, stage in enumerate(sched):
    kind = estimator.canvas_kind(config, stage)
    groups.append(first.setdefault(("shared", kind) if kind is not None else ("own", k), len(first)))
  return tuple(groups)


def iteration_canvas(
    config: HTGRPOConfig,
    k: int,
    step_key: jax.Array,
    image_tokens: jax.Array,
    commit_step: jax.Array,
    is_structure: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Canvas and loss set of inner iteration ``k`` (static int), from the config's estimator.

  Args:
    config: the HT-GRPO config (estimator, stages, fractions).
    k: inner iteration, 0 <= k < K.
    step_key: the step's key, fold_in(run_key, step); iteration k uses fold_in(step_key, k).
    image_tokens: int32[B, N] rollout codes.
    commit_step: int32[B, N] sampler step that fixed each token.
    is_structure: bool[B, N] the partition (True on S).

  Returns:
    (canvas int32[B, N], loss_mask bool[B, N]).
  """
  estimator = ESTIMATOR_REGISTRY.get(config.estimator)
  sched = hierarchy.stage_schedule(config.n_global, config.n_struct, config.n_refine)
  stage = sched[k]
  frac = hierarchy.update_fractions(config)[k]
  key_k = jax.random.fold_in(step_key, k)
  k_sel, k_mask = jax.random.split(key_k)
  cand = hierarchy.stage_candidates(stage, is_structure)
  return estimator.canvas(
      config,
      Iteration(
          k=k,
          stage=stage,
          fraction=frac,
          step_key=step_key,
          k_sel=k_sel,
          k_mask=k_mask,
          candidates=cand,
          image_tokens=image_tokens,
          commit_step=commit_step,
          is_structure=is_structure,
      ),
  )


def all_canvases(
    config: HTGRPOConfig, step_key: jax.Array, image_tokens: jax.Array, commit_step: jax.Array, is_structure: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Stacked canvases and loss sets of all K iterations: (int32[K, B, N], bool[K, B, N])."""
  outs = [
      iteration_canvas(config, k, step_key, image_tokens, commit_step, is_structure)
      for k in range(config.num_iterations)
  ]
  return jnp.stack([c for c, _ in outs]), jnp.stack([m for _, m in outs])
