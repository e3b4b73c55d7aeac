"""Jitted sketch/paint samplers with classifier-free guidance and a per-token trajectory record.

A sampler runs T unmasking steps on an image canvas (``int32[B, N]``, ``MASK = -1`` where masked).
Step s (0-based):
  1. logits = canvas_logits_fn(params, prompt, canvas) in fp32; with CFG the conditional and the
     unconditional rows go through ONE forward of 2B rows and are combined as
     (1 + s) * cond - s * uncond (MUSE / MMaDA / DiMOO form);
  2. every slot draws a token from q (inverse CDF in fp32): q = softmax(logits / temperature) for
     temperature_mode 'constant' (DiMOO), softmax(logits) for 'mmada_annealed' (MMaDA);
  3. a rule picks which masked slots commit: ``maskgit`` leaves the m_s least confident masked
     (confidence log softmax(logits)[token] + tau_s * Gumbel) and commits the rest, ``emerge``
     commits each masked slot independently with the schedule's probability; the last step
     commits every remaining slot;
  4. committed slots never change again; each records its step, the entropy of q and log q(token).

``sketch`` runs steps [0, sketch_steps), ``paint`` runs [sketch_steps, T) and ``sample`` runs both;
step s always uses the key ``fold_in(key, s)``, so ``paint(sketch(x, key), key) == sample(x, key)``.
``branch`` repeats each sketch g times (contiguous) so those g paints share one layout; the trainer
sketches M = rl.num_sketches times per prompt and branches each into G / M paints (hierarchical
groups: one shared sketch per group would leave the sketch tokens no group-relative signal).
With ``config.cache.enabled`` (off by default) the steps between full refreshes recompute only
the least confident positions against cached keys and values (``CacheConfig``, ``contracts.CachedLogits``): faster,
and a different distribution from the policy's, so it is for evaluation, never training rollouts.
``guided_canvas_logits_fn`` turns the sampler's guided, tempered distribution into a policy the RL
update can score (``rl.estimator_guidance='guided'``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from htgrpo_jax import parallel
from htgrpo_jax.contracts import MASK, CachedLogits, CanvasLogitsFn, Registry, Rollout
from htgrpo_jax.sampling.config import SamplerConfig

UNCOMMITTED = -1  # commit_step of a slot that is still masked


@struct.dataclass
class CanvasState:
  """A partially unmasked canvas and the trajectory record so far (leading dim B).

  Attributes:
    canvas: int32[B, N] codes in [0, C) where committed, MASK (-1) where still masked.
    commit_step: int32[B, N] step that fixed each slot; -1 while masked.
    commit_entropy: float32[B, N] entropy (nats) of the distribution the token was drawn from.
    commit_logp: float32[B, N] log-prob of the committed token under that distribution.
    step: int32[] index of the next step to run (== sketch_steps after ``sketch``).
    prompt_tokens: int32[B, Lp] conditional prompt tokens.
    uncond_tokens: int32[B, Lp] unconditional (CFG) prompt tokens.
  """

  canvas: jax.Array
  commit_step: jax.Array
  commit_entropy: jax.Array
  commit_logp: jax.Array
  step: jax.Array
  prompt_tokens: jax.Array
  uncond_tokens: jax.Array


@struct.dataclass
class SampleRecord:
  """The finished images and their trajectory record (field names match ``Rollout``).

  Attributes:
    image_tokens: int32[B, N] codes in [0, C).
    commit_step: int32[B, N] step in [0, T) that fixed each token.
    commit_entropy: float32[B, N] entropy (nats) of the CFG'd, temperature-scaled distribution the
      token was drawn from.
    commit_logp: float32[B, N] log-prob of the token under that distribution.
  """

  image_tokens: jax.Array
  commit_step: jax.Array
  commit_entropy: jax.Array
  commit_logp: jax.Array

  def to_rollout(self, prompt_tokens: jax.Array, rewards: jax.Array) -> Rollout:
    """A ``Rollout`` from this record plus the prompts (int32[B, Lp]) and rewards (float32[B])."""
    return Rollout(
        prompt_tokens=prompt_tokens,
        image_tokens=self.image_tokens,
        commit_step=self.commit_step,
        commit_entropy=self.commit_entropy,
        commit_logp=self.commit_logp,
        rewards=rewards,
    )


def trajectory_canvas(image_tokens: jax.Array, commit_step: jax.Array, step) -> jax.Array:
  """int32[B, N]: the canvas the sampler saw at the start of ``step`` (tokens fixed before it)."""
  return jnp.where(commit_step < step, image_tokens, MASK).astype(jnp.int32)


def guided_logits(
    canvas_logits_fn: CanvasLogitsFn,
    params: Any,
    prompt_tokens: jax.Array,
    uncond_tokens: jax.Array,
    canvas: jax.Array,
    cfg_scale: float,
) -> jax.Array:
  """float32[B, N, C]: (1 + s) * cond - s * uncond, both halves from one forward of 2B rows.

  The 2B batch interleaves rows (cond_0, uncond_0, cond_1, ...) rather than concatenating the two
  halves: with the batch sharded over devices each device then holds the cond and uncond copies
  of its own rows, so building and splitting the batch moves no data between devices. Rows are
  independent in ``canvas_logits_fn``, so the order does not change any logit.
  """
  if cfg_scale == 0.0:  # static: no unconditional pass at all
    return canvas_logits_fn(params, prompt_tokens, canvas).astype(jnp.float32)
  b = canvas.shape[0]
  prompts = jnp.stack([prompt_tokens, uncond_tokens], axis=1).reshape(2 * b, -1)
  canvases = jnp.repeat(canvas, 2, axis=0)
  both = canvas_logits_fn(params, prompts, canvases).astype(jnp.float32)
  both = both.reshape(b, 2, *both.shape[1:])
  cond, uncond = both[:, 0], both[:, 1]
  return (1.0 + cfg_scale) * cond - cfg_scale * uncond


def guided_canvas_logits_fn(canvas_logits_fn: CanvasLogitsFn, config: SamplerConfig, uncond_prompt) -> CanvasLogitsFn:
  """The logits tokens are drawn from, as a ``CanvasLogitsFn`` for the RL update.

  ``(params, prompt_tokens int32[B, Lp], canvas int32[B, N]) -> float32[B, N, C]``: ``guided_logits``
  with ``config.cfg_scale`` and the unconditional prompt on every row, divided by
  ``config.sample_temperature``, so log_softmax of it is exactly the sampler's log q (the recorded
  ``commit_logp``). This is ``HTGRPOConfig.estimator_guidance='guided'``: old, reference and current
  passes all score the behaviour distribution (each forward runs 2B rows when CFG is on).

  Args:
    canvas_logits_fn: the bare conditional policy.
    config: the sampler config the rollouts were drawn with.
    uncond_prompt: int[Lp], the unconditional (CFG) prompt row, e.g. ``layout.unconditional_prompts(1)[0]``.

  Raises:
    ValueError: ``uncond_prompt`` is not one row of integers.
  """
  row = np.asarray(uncond_prompt)
  if row.ndim != 1 or not np.issubdtype(row.dtype, np.integer):
    raise ValueError(f"uncond_prompt: expected one int row [Lp], got shape {row.shape} dtype {row.dtype}")
  row = row.astype(np.int32)
  temp = config.sample_temperature

  def fn(params, prompt_tokens, canvas):
    uncond = jnp.broadcast_to(jnp.asarray(row), prompt_tokens.shape)
    logits = guided_logits(canvas_logits_fn, params, prompt_tokens, uncond, canvas, config.cfg_scale)
    return logits / temp if temp != 1.0 else logits

  return fn


def _sampling_log_probs(logits: jax.Array, temperature: float) -> jax.Array:
  """float32[..., C]: log q with q = softmax(logits / temperature), fp32."""
  if temperature != 1.0:
    logits = logits / temperature
  return jax.nn.log_softmax(logits, axis=-1)


def _entropy(logq: jax.Array, q: jax.Array | None = None) -> jax.Array:
  # q log q -> 0 where q == 0 (log q = -inf would give nan otherwise).
  q = jnp.exp(logq) if q is None else q
  return -jnp.sum(jnp.where(q > 0, q * logq, 0.0), axis=-1)


def replay_commit_stats(
    canvas_logits_fn: CanvasLogitsFn,
    config: SamplerConfig,
    params: Any,
    prompt_tokens: jax.Array,
    uncond_tokens: jax.Array,
    image_tokens: jax.Array,
    commit_step: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Recomputes (commit_entropy, commit_logp), float32[B, N] each, from a finished trajectory.

  Rebuilds the canvas before every step from ``image_tokens`` and ``commit_step``, re-runs the
  guided logits and reads each token's statistics at its own commit step. Costs T forwards;
  meant for checks and for trajectory-based estimators. Traceable (jit it).
  """
  b, n = image_tokens.shape
  temp = config.sample_temperature

  def body(s, carry):
    ent, lp = carry
    canvas = trajectory_canvas(image_tokens, commit_step, s)
    logq = _sampling_log_probs(
        guided_logits(canvas_logits_fn, params, prompt_tokens, uncond_tokens, canvas, config.cfg_scale), temp
    )
    here = commit_step == s
    tok_lp = jnp.take_along_axis(logq, jnp.maximum(image_tokens, 0)[..., None], -1)[..., 0]
    return (jnp.where(here, _entropy(logq), ent), jnp.where(here, tok_lp, lp))

  zeros = jnp.zeros((b, n), jnp.float32)
  return jax.lax.fori_loop(0, config.num_steps, body, (zeros, zeros))


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Jitted sampler entry points built by ``make_sampler`` (see the module docstring).

  Attributes:
    config: the static ``SamplerConfig``.
    num_tokens: N, image tokens per canvas.
    mesh: the device mesh batches are sharded on (over ('data', 'fsdp')), or None.
    sketch: (params, prompt_tokens int32[B, Lp], uncond_tokens int32[B, Lp] | None, key)
      -> CanvasState after steps [0, sketch_steps).
    paint: (params, state: CanvasState, key) -> SampleRecord after steps [sketch_steps, T).
    sample: (params, prompt_tokens, uncond_tokens, key) -> SampleRecord; == paint(sketch(.)).
    branch: (state, g: int) -> CanvasState with every row repeated g times, contiguously.
  """

  config: SamplerConfig
  num_tokens: int
  mesh: Mesh | None
  sketch: Callable[..., CanvasState]
  paint: Callable[..., SampleRecord]
  sample: Callable[..., SampleRecord]
  branch: Callable[[CanvasState, int], CanvasState]


class RuleInputs(NamedTuple):
  """What a commit rule sees at sampler step ``s`` (inside the jitted loop).

  Attributes:
    s: the step index (traced).
    logits: float32[B, N, C] guided logits.
    tokens: int32[B, N] the token each slot drew from q.
    tok_logq: float32[B, N] log q(token).
    masked: bool[B, N] slots still masked before this step.
    u_rule: float32[B, N] the rule's uniforms in [0, 1).
    temperature: the static sampling temperature of q.
    noise_scales, masked_after, unmask_probs: the config's static per-step tables
      (``SamplerConfig.noise_scales()``, ``.masked_after(N)``, ``.unmask_probs()``).
    spread, grid_width: ``SamplerConfig.spread`` and the square grid's side (static; 0 when off).
  """

  s: jax.Array
  logits: jax.Array
  tokens: jax.Array
  tok_logq: jax.Array
  masked: jax.Array
  u_rule: jax.Array
  temperature: float
  noise_scales: np.ndarray
  masked_after: np.ndarray
  unmask_probs: np.ndarray
  spread: int = 0
  grid_width: int = 0


# ``SamplerConfig.rule`` -> ``RuleInputs -> commit bool[B, N]`` (which masked slots commit at step s).
COMMIT_RULES: Registry[Callable[[RuleInputs], jax.Array]] = Registry("SamplerConfig.rule")


def _gumbel_from(u):
  tiny = jnp.finfo(jnp.float32).tiny
  return -jnp.log(-jnp.log(jnp.maximum(u, tiny)))


@COMMIT_RULES.register("maskgit")
def maskgit_commit(x: RuleInputs) -> jax.Array:
  """Keep the ``masked_after[s]`` least confident masked slots masked; commit the rest."""
  # Confidence is the untempered guided probability of the draw (MMaDA and DiMOO both score
  # softmax(logits), not the tempered q); annealed or constant Gumbel noise breaks ties.
  if x.temperature == 1.0:
    log_conf = x.tok_logq
  else:
    log_conf = jnp.take_along_axis(jax.nn.log_softmax(x.logits, -1), x.tokens[..., None], -1)[..., 0]
  score = log_conf + jnp.asarray(x.noise_scales)[x.s] * _gumbel_from(x.u_rule)
  # Committed slots rank last (never chosen to stay masked); masked ones by ascending score.
  score = jnp.where(x.masked, score, jnp.inf)
  keep = jnp.minimum(jnp.asarray(x.masked_after)[x.s], jnp.sum(x.masked, -1, dtype=jnp.int32))
  if x.spread:
    return _spread_commit(score, x.masked, jnp.sum(x.masked, -1, dtype=jnp.int32) - keep, x.grid_width, x.spread)
  rank = jnp.argsort(jnp.argsort(score, axis=-1, stable=True), axis=-1, stable=True)
  return x.masked & (rank >= keep[:, None])


def _spread_commit(score: jax.Array, masked: jax.Array, count: jax.Array, width: int, radius: int) -> jax.Array:
  """bool[B, N]: ``count[b]`` masked slots of row b, chosen one at a time by descending ``score``
  (float32[B, N], +inf on committed slots), where a slot within Chebyshev distance ``radius`` of one
  already chosen (on the ``width``-wide grid) ranks below every slot that is not. With no
  neighbour chosen this is MaskGIT's top-``count``."""
  n = score.shape[-1]
  pos = jnp.arange(n)
  row, col = pos // width, pos % width
  # Two tiers: any slot far from this step's choices outranks any near one (scores are finite).
  finite = jnp.where(masked, score, 0.0)
  span = jnp.max(finite, -1, keepdims=True) - jnp.min(finite, -1, keepdims=True) + 1.0

  def body(i, carry):
    chosen, blocked = carry
    pri = jnp.where(masked & ~chosen, finite - jnp.where(blocked, span, 0.0), -jnp.inf)
    j = jnp.argmax(pri, -1)
    take = (i < count)[:, None]
    chosen = chosen | (take & (pos[None, :] == j[:, None]))
    near = (jnp.abs(row[None, :] - row[j][:, None]) <= radius) & (jnp.abs(col[None, :] - col[j][:, None]) <= radius)
    return chosen, blocked | (take & near)

  zeros = jnp.zeros_like(masked)
  chosen, _ = jax.lax.fori_loop(0, jnp.max(count), body, (zeros, zeros))
  return chosen


@COMMIT_RULES.register("emerge")
def emerge_commit(x: RuleInputs) -> jax.Array:
  """Commit each masked slot independently with the schedule's probability ``unmask_probs[s]``."""
  return x.masked & (x.u_rule < jnp.asarray(x.unmask_probs)[x.s])  # u < 1 always: the last step fills all


def make_sampler(
    canvas_logits_fn: CanvasLogitsFn,
    config: SamplerConfig,
    *,
    num_tokens: int,
    mesh: Mesh | None = None,
    params_sharding: Any = None,
    cached_logits: CachedLogits | None = None,
) -> Sampler:
  """Builds the jitted sketch / paint / sample / branch functions.

  Args:
    canvas_logits_fn: (params, prompt_tokens int32[B, Lp], canvas int32[B, N]) -> float[B, N, C];
      rows must be independent (the CFG batch reorders them).
    config: a ``SamplerConfig``.
    num_tokens: N, the number of image slots per canvas.
    mesh: optional mesh; batches are then split over ('data', 'fsdp') through in/out shardings
      and B must be a multiple of data * fsdp.
    params_sharding: optional sharding pytree (prefix) for params under ``mesh``; None keeps the
      sharding the params arrive with.
    cached_logits: the policy's ``CachedLogits`` (``models.policy.make_cached_logits``); required
      when ``config.cache.enabled`` (the rollout cache; docs/performance.md), unused otherwise.

  Raises:
    ValueError: bad config / num_tokens / cached_logits (naming the field), before anything is
      compiled.
  """
  if not isinstance(config, SamplerConfig):
    raise ValueError(f"config: expected a SamplerConfig, got {type(config).__name__}")
  if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or num_tokens < 1:
    raise ValueError(f"num_tokens: must be a positive int, got {num_tokens!r}")
  num_tokens = int(num_tokens)
  if mesh is not None:
    mesh = parallel.auto_mesh(mesh)
  cfg = config
  t_total, t_sketch = cfg.num_steps, cfg.sketch_steps
  temp = cfg.sample_temperature
  masked_after = cfg.masked_after(num_tokens)
  noise_scales = cfg.noise_scales()
  unmask_probs = cfg.unmask_probs()
  grid_width = cfg.grid_width(num_tokens)
  commit_rule = COMMIT_RULES.get(cfg.rule)
  use_cache = cfg.cache.enabled
  if use_cache:
    if not isinstance(cached_logits, CachedLogits):
      raise ValueError(
          "cached_logits: config.cache.enabled needs the policy's CachedLogits "
          f"(models.policy.make_cached_logits), got {type(cached_logits).__name__}"
      )
    image_positions = np.asarray(cached_logits.image_positions, np.int32)
    if image_positions.shape != (num_tokens,):
      raise ValueError(
          f"cached_logits.image_positions: shape {image_positions.shape}, expected " f"({num_tokens},) (num_tokens)"
      )
    if image_positions.size and np.all(np.diff(image_positions) == 1):  # a static slice, no gather
      image_positions = slice(int(image_positions[0]), int(image_positions[-1]) + 1)
    n_recompute = cfg.cache.num_recomputed(int(cached_logits.seq_len))
    refresh_steps = cfg.cache.refresh_steps(t_total, t_sketch)

  def batch_spec(ndim):
    return NamedSharding(mesh, P(parallel.BATCH_AXES, *([None] * (ndim - 1))))

  def step_uniforms(key, s, shape):
    """float32[B, N, 2] uniforms in [0, 1) for step s: one per slot for the token draw, one for
    the commit rule. One threefry draw per step, flat then reshaped (XLA:CPU compiles threefry
    over a multi-dimensional iota several times slower). Under a mesh the draw is split like the
    batch so no device draws the whole batch; threefry_partitionable (JAX's default) keeps the
    values independent of the split."""
    u = jax.random.uniform(jax.random.fold_in(key, s), (int(np.prod(shape)),), jnp.float32)
    u = u.reshape(shape)
    return u if mesh is None else jax.lax.with_sharding_constraint(u, batch_spec(len(shape)))

  def step_fn(params, state: CanvasState, s, key) -> CanvasState:
    logits = guided_logits(
        canvas_logits_fn, params, state.prompt_tokens, state.uncond_tokens, state.canvas, cfg.cfg_scale
    )
    return advance(state, logits, s, key)

  def advance(state: CanvasState, logits, s, key) -> CanvasState:
    """Step s from its guided logits float32[B, N, C]: draw, commit, record."""
    canvas = state.canvas
    b, n = canvas.shape
    masked = canvas == MASK
    c = logits.shape[-1]
    u = step_uniforms(key, s, (b, n, 2))
    u_tok, u_rule = u[..., 0], u[..., 1]
    logq = _sampling_log_probs(logits, temp)
    q = jnp.exp(logq)
    # Inverse-CDF draw from q: the first index whose cumulative mass reaches u * total. One
    # uniform per slot instead of C Gumbels (argmax(logq + G) samples the same distribution but
    # costs C threefry draws and 2C logs per slot: ~3x the sampler's own work per step on CPU).
    # Scaling by the total absorbs fp32 round-off in the normalisation; u > 0 keeps a
    # zero-probability first entry from being picked.
    cdf = jnp.cumsum(q, axis=-1)
    x = jnp.maximum(u_tok, jnp.finfo(jnp.float32).tiny)[..., None] * cdf[..., -1:]
    tokens = jnp.minimum(jnp.sum(cdf < x, axis=-1, dtype=jnp.int32), c - 1)
    tok_logq = jnp.take_along_axis(logq, tokens[..., None], -1)[..., 0]

    commit = commit_rule(
        RuleInputs(
            s=s,
            logits=logits,
            tokens=tokens,
            tok_logq=tok_logq,
            masked=masked,
            u_rule=u_rule,
            temperature=temp,
            noise_scales=noise_scales,
            masked_after=masked_after,
            unmask_probs=unmask_probs,
            spread=cfg.spread,
            grid_width=grid_width,
        )
    )

    return state.replace(
        canvas=jnp.where(commit, tokens, canvas),
        commit_step=jnp.where(commit, s, state.commit_step).astype(jnp.int32),
        commit_entropy=jnp.where(commit, _entropy(logq, q), state.commit_entropy),
        commit_logp=jnp.where(commit, tok_logq, state.commit_logp),
        step=jnp.asarray(s + 1, jnp.int32),
    )

  def cache_rows(state):
    """The forward's rows: cond/uncond interleaved as in ``guided_logits`` (R = 2B with CFG)."""
    if not cfg.use_cfg:
      return state.prompt_tokens, state.canvas
    b = state.canvas.shape[0]
    prompts = jnp.stack([state.prompt_tokens, state.uncond_tokens], axis=1).reshape(2 * b, -1)
    return prompts, jnp.repeat(state.canvas, 2, axis=0)

  def cached_step(params, carry, s, key):
    """Step s under the rollout cache: a full forward on refresh steps, else the k positions
    with the lowest cached max logit recomputed against the cached keys/values (per row, so the
    cond and uncond rows of CFG each pick their own)."""
    state, row_logits, kv, selectable = carry
    prompts, canvases = cache_rows(state)

    def refresh(row_logits, kv):
      return cached_logits.full(params, prompts, canvases)

    def recompute(row_logits, kv):
      conf = jnp.where(selectable, jnp.max(row_logits, axis=-1), jnp.inf)
      _, pos = jax.lax.top_k(-conf, n_recompute)
      fresh, kv = cached_logits.partial(params, prompts, canvases, pos, kv)
      rows = jnp.arange(pos.shape[0])[:, None]
      return row_logits.at[rows, pos].set(fresh.astype(row_logits.dtype)), kv

    row_logits, kv = jax.lax.cond(jnp.asarray(refresh_steps)[s], refresh, recompute, row_logits, kv)
    both = row_logits[:, image_positions]
    if cfg.use_cfg:
      both = both.reshape(-1, 2, *both.shape[1:])
      logits = (1.0 + cfg.cfg_scale) * both[:, 0] - cfg.cfg_scale * both[:, 1]
    else:
      logits = both
    return advance(state, logits, s, key), row_logits, kv, selectable

  def run_cached(params, state, key, lo, hi):
    prompts, canvases = cache_rows(state)
    # Step lo is always a refresh: the zero caches below are never read.
    logit_shape, kv_shape = jax.eval_shape(cached_logits.full, params, prompts, canvases)
    zeros = lambda t: jnp.zeros(t.shape, t.dtype)
    carry = (state, zeros(logit_shape), jax.tree.map(zeros, kv_shape), cached_logits.selectable(prompts))
    carry = jax.lax.fori_loop(lo, hi, lambda s, c: cached_step(params, c, s, key), carry)
    return carry[0]

  def run_steps(params, state, key, lo, hi):
    if lo == hi:
      return state
    if use_cache:
      return run_cached(params, state, key, lo, hi)
    return jax.lax.fori_loop(lo, hi, lambda s, st: step_fn(params, st, s, key), state)

  def init_state(prompt_tokens, uncond_tokens):
    b = prompt_tokens.shape[0]
    full = lambda v, dt: jnp.full((b, num_tokens), v, dt)
    return CanvasState(
        canvas=full(MASK, jnp.int32),
        commit_step=full(UNCOMMITTED, jnp.int32),
        commit_entropy=full(0.0, jnp.float32),
        commit_logp=full(0.0, jnp.float32),
        step=jnp.zeros((), jnp.int32),
        prompt_tokens=prompt_tokens.astype(jnp.int32),
        uncond_tokens=uncond_tokens.astype(jnp.int32),
    )

  def to_record(state):
    return SampleRecord(
        image_tokens=state.canvas,
        commit_step=state.commit_step,
        commit_entropy=state.commit_entropy,
        commit_logp=state.commit_logp,
    )

  def sketch_impl(params, prompt_tokens, uncond_tokens, key):
    return run_steps(params, init_state(prompt_tokens, uncond_tokens), key, 0, t_sketch)

  def paint_impl(params, state, key):
    return to_record(run_steps(params, state, key, t_sketch, t_total))

  def sample_impl(params, prompt_tokens, uncond_tokens, key):
    # One loop over [0, T): the same step function and keys as sketch then paint (so the same
    # draws), compiled once instead of twice.
    return to_record(run_steps(params, init_state(prompt_tokens, uncond_tokens), key, 0, t_total))

  def branch_impl(state, g):
    rep = lambda x: jnp.repeat(x, g, axis=0)
    return state.replace(
        canvas=rep(state.canvas),
        commit_step=rep(state.commit_step),
        commit_entropy=rep(state.commit_entropy),
        commit_logp=rep(state.commit_logp),
        prompt_tokens=rep(state.prompt_tokens),
        uncond_tokens=rep(state.uncond_tokens),
    )

  if mesh is None:
    jit_sketch, jit_paint, jit_sample = jax.jit(sketch_impl), jax.jit(paint_impl), jax.jit(sample_impl)
    jit_branch = jax.jit(branch_impl, static_argnums=1)
  else:
    rep_s = parallel.replicated(mesh)
    if params_sharding is not None:
      params_sharding = jax.tree.map(
          lambda sh: NamedSharding(mesh, sh.spec) if isinstance(sh, NamedSharding) else sh, params_sharding
      )
    b2 = batch_spec(2)
    state_s = CanvasState(
        canvas=b2, commit_step=b2, commit_entropy=b2, commit_logp=b2, step=rep_s, prompt_tokens=b2, uncond_tokens=b2
    )
    record_s = SampleRecord(image_tokens=b2, commit_step=b2, commit_entropy=b2, commit_logp=b2)
    jit_sketch = jax.jit(sketch_impl, in_shardings=(params_sharding, b2, b2, rep_s), out_shardings=state_s)
    jit_paint = jax.jit(paint_impl, in_shardings=(params_sharding, state_s, rep_s), out_shardings=record_s)
    jit_sample = jax.jit(sample_impl, in_shardings=(params_sharding, b2, b2, rep_s), out_shardings=record_s)
    jit_branch = jax.jit(branch_impl, static_argnums=1, in_shardings=(state_s,), out_shardings=state_s)

  def relabel(*args):
    return args if mesh is None else parallel.onto_mesh(args, mesh)

  # ---- host-side argument checks (shapes only: no device sync), then the compiled call ----

  def check_batch(name, b):
    if mesh is not None:
      div = parallel.batch_size_divisor(mesh)
      if b % div:
        raise ValueError(f"{name}: batch {b} is not a multiple of data*fsdp = {div}")

  def check_prompts(prompt_tokens, uncond_tokens):
    if prompt_tokens is None or np.ndim(prompt_tokens) != 2:
      raise ValueError(f"prompt_tokens: expected int[B, Lp], got shape {np.shape(prompt_tokens)}")
    if not jnp.issubdtype(jnp.result_type(prompt_tokens), jnp.integer):
      raise ValueError(f"prompt_tokens: expected an integer dtype, got {jnp.result_type(prompt_tokens)}")
    if uncond_tokens is None:
      if cfg.use_cfg:
        raise ValueError(f"uncond_tokens: required when cfg_scale = {cfg.cfg_scale} != 0")
      uncond_tokens = prompt_tokens  # carried but never read without CFG
    if np.shape(uncond_tokens) != np.shape(prompt_tokens):
      raise ValueError(
          f"uncond_tokens: shape {np.shape(uncond_tokens)} != prompt_tokens shape "
          f"{np.shape(prompt_tokens)} (the CFG batch stacks them row by row)"
      )
    if not jnp.issubdtype(jnp.result_type(uncond_tokens), jnp.integer):
      raise ValueError(f"uncond_tokens: expected an integer dtype, got {jnp.result_type(uncond_tokens)}")
    check_batch("prompt_tokens", np.shape(prompt_tokens)[0])
    return prompt_tokens, uncond_tokens

  def check_state(state):
    if not isinstance(state, CanvasState):
      raise ValueError(f"state: expected a CanvasState, got {type(state).__name__}")
    if state.canvas.ndim != 2 or state.canvas.shape[1] != num_tokens:
      raise ValueError(f"state.canvas: shape {state.canvas.shape}, expected (B, {num_tokens})")
    check_batch("state.canvas", state.canvas.shape[0])

  @functools.wraps(sketch_impl)
  def sketch(params, prompt_tokens, uncond_tokens, key) -> CanvasState:
    prompt_tokens, uncond_tokens = check_prompts(prompt_tokens, uncond_tokens)
    return jit_sketch(*relabel(params, prompt_tokens, uncond_tokens, key))

  @functools.wraps(paint_impl)
  def paint(params, state, key) -> SampleRecord:
    check_state(state)
    return jit_paint(*relabel(params, state, key))

  @functools.wraps(sample_impl)
  def sample(params, prompt_tokens, uncond_tokens, key) -> SampleRecord:
    prompt_tokens, uncond_tokens = check_prompts(prompt_tokens, uncond_tokens)
    return jit_sample(*relabel(params, prompt_tokens, uncond_tokens, key))

  def branch(state, g) -> CanvasState:
    if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1:
      raise ValueError(f"g: group size must be a positive int, got {g!r}")
    check_state(state)
    return jit_branch(*relabel(state), int(g))

  return Sampler(config=cfg, num_tokens=num_tokens, mesh=mesh, sketch=sketch, paint=paint, sample=sample, branch=branch)
