"""One compiled HT-GRPO update: K inner policy-gradient iterations on one rollout batch.

``make_train_step`` returns ``step(state, rollout, key[, supervised]) -> (state, metrics)``, a single
jitted function:

1. per-token advantages (flat group advantages, or sketch-/paint-level ones for M sketches x G / M
   paints per prompt), the sketch/paint partition, credit weights;
2. the K canvases and loss sets (``estimators``), then old and reference log-probs once per *distinct*
   canvas (stop-gradient; old = params at the start of the step, so the ratio at k = 0 is 1 up to
   float round-off: XLA may fuse the stop-gradient pass and the differentiated one differently, so
   it is bitwise 1 for the tests' toy policies but a few ulp off for the fp32 LLaDA, |rho - 1| <=
   5e-7 on the tiny ShapeEval model over 8 devices);
3. ``lax.scan`` over the K updates; inside, ``lax.scan`` over micro-batches accumulates gradients of the
   unreduced loss sums divided by the iteration's total token count (exact token mean); the credit is
   normalised per image or per iteration's loss set (``credit_normalization``);
4. with ``ptx_coef > 0``, each iteration adds ``ptx_coef`` x the gradient of the masked-token loss
   on the ``supervised`` batch (ground truth, one fresh mask per iteration; ``rl.supervised``);
5. a non-finite loss, gradient, new params or new optimizer state skips that update: params and
   optimizer state stay as they were and ``state.skipped`` counts it.

With a frozen base (``state.frozen``, LoRA) ``state.params`` are the adapters: only they are
differentiated and updated, the policy is scored as ``Adapted(frozen, params)``, the reference as
``Adapted(frozen, None)`` (the adapters off; no ``ref_params``), and only the gradient passes get a
dropout key (``fold_in(fold_in(fold_in(step_key, k), salt), micro-batch)``).

Iteration k of step ``state.step`` draws everything from ``fold_in(fold_in(key, state.step), k)``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from htgrpo_jax import parallel
from htgrpo_jax.contracts import (
    MASK,
    CanvasLogitsFn,
    Rollout,
    TrainState,
    make_optimizer,  # noqa: F401 (rl.make_optimizer)
    policy_params,
)
from htgrpo_jax.rl import estimators, hierarchy, supervised as sup_lib
from htgrpo_jax.rl.advantages import token_advantages
from htgrpo_jax.rl.config import STAGE_NAMES, HTGRPOConfig
from htgrpo_jax.rl.loss import combine_metrics, finalize_metrics, ht_grpo_loss, token_logp_entropy

_PARTITION_SALT = 0x7FFF_FFF1  # fold_in salt of the 'random' partition (never a valid k)
_DROPOUT_SALT = 0x7FFF_FFF2  # fold_in salt of the adapters' dropout keys (never a valid k)
_PTX_SALT = 0x7FFF_FFF4  # fold_in salt of the supervised term's masks (never a valid k)


def rollout_shardings(mesh: Mesh) -> Rollout:
  """Batch-dim shardings of a Rollout on ``mesh`` (for ``in_shardings``)."""
  b = functools.partial(parallel.batch_sharding, mesh)
  return Rollout(
      prompt_tokens=b(2), image_tokens=b(2), commit_step=b(2), commit_entropy=b(2), commit_logp=b(2), rewards=b(1)
  )


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _split_mb(x: jax.Array | None, nmb: int):
  """[B, ...] -> [nmb, B / nmb, ...] (None passes through)."""
  return None if x is None else x.reshape((nmb, x.shape[0] // nmb) + x.shape[1:])


def behaviour_gap(
    canvases: jax.Array, old_logp: jax.Array, commit_step: jax.Array, commit_logp: jax.Array, num_steps: int
) -> tuple[jax.Array, jax.Array]:
  """Mean |commit_logp - old_logp| over the tokens whose scored canvas is the one they were drawn on.

  The sampler drew token i at step s_i from the canvas holding exactly the tokens committed before s_i;
  an estimator canvas is that canvas for token i iff i is masked there, every revealed token has
  commit_step < s_i and every masked one commit_step >= s_i, i.e. s_i == min(masked commit steps) >
  max(revealed commit steps). On such tokens the behaviour log-prob (``commit_logp``) and the old
  policy's log-prob share canvas and token, so their difference is the estimator's off-policyness:
  CFG and temperature (with ``estimator_guidance='none'``) plus round-off. It reuses the old passes
  (no extra forward); for 'htgrpo' the comparable tokens are those committed at step 0 (the all-mask
  canvas), for 'trajectory' with trajectory_group 1 (and the global/struct iterations of 'htgrpo' with
  sketch_context='trajectory') every token committed at the replayed step; a replayed refine canvas
  is comparable only where no S token was committed at or after the replayed step.

  Args:
    canvases: int32[D, B, N] the distinct canvases the old passes scored.
    old_logp: float32[D, B, N] their old log-probs.
    commit_step: int32[B, N]; commit_logp: float32[B, N] (the rollout record).
    num_steps: T.

  Returns:
    (mean absolute gap float32[], number of comparable tokens float32[]).
  """
  revealed = canvases != MASK
  cs = commit_step[None]
  hi = jnp.where(revealed, cs, -1).max(axis=-1, keepdims=True)
  lo = jnp.where(revealed, num_steps, cs).min(axis=-1, keepdims=True)
  comparable = ~revealed & (cs == lo) & (hi < lo)
  count = comparable.sum().astype(jnp.float32)
  gap = jnp.where(comparable, jnp.abs(commit_logp[None] - old_logp), 0.0).sum()
  return gap / jnp.maximum(count, 1.0), count


def _retarget(shardings: Any, mesh: Mesh) -> Any:
  """NamedShardings of a pytree (or prefix) moved onto ``mesh`` (same specs)."""
  return jax.tree.map(
      lambda s: NamedSharding(mesh, s.spec) if isinstance(s, NamedSharding) else s,
      shardings,
      is_leaf=lambda s: isinstance(s, NamedSharding),
  )


class TrainStep:
  """The jitted step plus host-side input checks that run before anything compiles.

  Call it as ``state, metrics = step(state, rollout, key)``, or with ``ptx_coef > 0``
  ``step(state, rollout, key, supervised)`` (a ``SupervisedBatch``); ``step.jitted`` is the raw
  ``jax.jit`` object (``.lower(...)`` for AOT compilation).
  """

  def __init__(self, jitted, config: HTGRPOConfig, mesh: Mesh | None = None):
    self.jitted = jitted
    self.config = config
    self.mesh = mesh  # the Auto-axis mesh the step is compiled for (None: unsharded jit)

  def _prepare(self, state, rollout, supervised):
    self.check(state, rollout, supervised)
    # No term: the program takes no batch. A plain (prompt_tokens, codes) tuple becomes the NamedTuple.
    supervised = sup_lib.SupervisedBatch(*supervised) if self.config.ptx_coef > 0 else None
    if self.mesh is not None:
      state, rollout, supervised = parallel.onto_mesh((state, rollout, supervised), self.mesh)
    return state, rollout, supervised

  def check(self, state: TrainState, rollout: Rollout, supervised: sup_lib.SupervisedBatch | None = None) -> None:
    rollout.validate()
    self.config.validate_batch(rollout.batch_size)
    if self.config.ptx_coef > 0:
      if supervised is None:
        raise ValueError(
            f"HTGRPOConfig.ptx_coef={self.config.ptx_coef} > 0 but the step got no supervised batch: pass "
            "step(state, rollout, key, SupervisedBatch(prompt_tokens, codes))"
        )
      supervised = sup_lib.SupervisedBatch(*supervised)
      supervised.validate(prompt_len=rollout.prompt_tokens.shape[1], num_tokens=rollout.image_tokens.shape[1])
    if self.config.beta > 0 and state.ref_params is None and state.frozen is None:
      raise ValueError(
          f"TrainState.ref_params is None but HTGRPOConfig.beta={self.config.beta} > 0 "
          "(and there is no frozen base to serve as the reference)"
      )

  def __call__(self, state: TrainState, rollout: Rollout, key: jax.Array, supervised=None):
    state, rollout, supervised = self._prepare(state, rollout, supervised)
    return self.jitted(state, rollout, key, supervised)

  def lower(self, state: TrainState, rollout: Rollout, key: jax.Array, supervised=None) -> "LoweredStep":
    """AOT: ``step.lower(state, rollout, key).compile()`` is called like the step itself."""
    state, rollout, supervised = self._prepare(state, rollout, supervised)
    return LoweredStep(self.jitted.lower(state, rollout, key, supervised), self._prepare)


class LoweredStep:
  """``jax.stages.Lowered`` of the step (``as_text``, ``cost_analysis``, ... pass through) whose
  ``compile()`` is called like the step: ``(state, rollout, key[, supervised])``. The program itself
  always takes the supervised slot (``None`` without the term), which a bare ``Compiled`` would make
  every caller pass."""

  def __init__(self, lowered, prepare):
    self._lowered, self._prepare = lowered, prepare

  def compile(self, *args, **kwargs) -> "CompiledStep":
    return CompiledStep(self._lowered.compile(*args, **kwargs), self._prepare)

  def __getattr__(self, name):
    return getattr(self._lowered, name)


class CompiledStep:
  """``jax.stages.Compiled`` of the step, called as ``state, metrics = compiled(state, rollout, key)``
  with the same host checks as the jitted step; other attributes pass through."""

  def __init__(self, compiled, prepare):
    self._compiled, self._prepare = compiled, prepare

  def __call__(self, state: TrainState, rollout: Rollout, key: jax.Array, supervised=None):
    state, rollout, supervised = self._prepare(state, rollout, supervised)
    return self._compiled(state, rollout, key, supervised)

  def __getattr__(self, name):
    return getattr(self._compiled, name)


class UpdateSets(NamedTuple):
  """What one RL step draws before its K inner iterations (``update_sets``).

  token_adv: float32[B, N] group advantage per token, before credit; is_structure: bool[B, N] the
  partition S; credit: float32[B, N] credit weights; stage_credit: credit normalised per loss set
  (``hierarchy.loss_set_credit``) rather than over all N; canvases: int32[K, B, N] (MASK where
  masked); loss_masks: bool[K, B, N]; replay_weights: float32[K, B] each image's weight in iteration k
  (``estimators.replay_weights``: all 1 unless ``replay_correction``).
  """

  token_adv: jax.Array
  is_structure: jax.Array
  credit: jax.Array
  stage_credit: bool
  canvases: jax.Array
  loss_masks: jax.Array
  replay_weights: jax.Array


def update_sets(config: HTGRPOConfig, rollout: Rollout, step_key: jax.Array) -> UpdateSets:
  """The partition, credit, canvases and loss sets of one step (``step_key`` = fold_in(key, step)),
  exactly as ``make_train_step`` draws them; reference implementations of the update use it too."""
  tok_adv = token_advantages(rollout.rewards, rollout.commit_step, config)
  is_s = hierarchy.partition_tokens(
      rollout.commit_step,
      rollout.commit_entropy,
      num_steps=config.num_sampler_steps,
      sketch_fraction=config.sketch_fraction,
      structure_ratio=config.structure_ratio,
      mode=config.partition_mode,
      key=jax.random.fold_in(step_key, _PARTITION_SALT),
  )
  stage_credit = config.normalize_credit and config.credit_normalization == "stage"
  w = hierarchy.credit_weights(
      is_s,
      structure_weight=config.structure_weight,
      refine_weight=config.refine_weight,
      normalize=config.normalize_credit and not stage_credit,
  )
  canvases, masks = estimators.all_canvases(config, step_key, rollout.image_tokens, rollout.commit_step, is_s)
  rw = estimators.replay_weights(config, rollout.commit_step, is_s, masks)
  return UpdateSets(tok_adv, is_s, w, stage_credit, canvases, masks, rw)


def make_train_step(
    canvas_logits_fn: CanvasLogitsFn,
    optimizer: optax.GradientTransformation,
    config: HTGRPOConfig,
    *,
    mesh: Mesh | None = None,
    state_shardings: Any = None,
    donate: bool = True,
    supervised_logits_fn: CanvasLogitsFn | None = None,
) -> TrainStep:
  """Builds the compiled HT-GRPO update.

  Args:
    canvas_logits_fn: ``(params, prompt_tokens int32[B, Lp], canvas int32[B, N]) -> float[B, N, C]``:
      the distribution the ratios score (for ``estimator_guidance='guided'`` the caller passes the
      sampler's guided, tempered logits, e.g. ``sampling.guided_canvas_logits_fn``).
    optimizer: an optax transformation (e.g. ``make_optimizer``), applied once per inner iteration.
    config: a validated ``HTGRPOConfig``.
    mesh: when given, the step is jitted with explicit shardings: the rollout split over the batch axes
      ('data', 'fsdp'), the key and metrics replicated, the state on ``state_shardings`` (replicated when
      None). An Explicit-axis mesh (``jax.make_mesh``'s default) is used through its Auto twin; inputs
      placed on either are accepted.
    state_shardings: a pytree (or prefix) of shardings matching ``TrainState``.
    donate: donate the input state's buffers.
    supervised_logits_fn: the distribution the supervised term (``ptx_coef``) trains, the bare
      conditional policy; default ``canvas_logits_fn`` (pass the unguided one when that is guided).

  Returns:
    A ``TrainStep``: ``(state, rollout, key) -> (state, metrics)``. ``metrics`` holds, for 'total' and
    each stage present ('global', 'struct', 'refine'), token means of loss, pg_loss, kl (to the
    reference), clip_frac, approx_kl (old vs new), ratio_mean/min/max, entropy, advantage, credit (mean
    credit weight on the loss tokens), tokens and grad_norm (mean over the stage's iterations);
    per-iteration arrays under 'iter'; reward/advantage statistics; the partition's
    'structure_frac' (|S| / N), 'structure_selectivity' (mean |S| / |sketch-phase candidates|) and
    'structure_all_candidates_frac' (images whose S is every candidate: no selection);
    'behaviour_gap' / 'behaviour_gap_tokens' (``behaviour_gap``); 'skipped' (this step) and
    'skipped_total'; with ``ptx_coef > 0`` each stage's 'ptx_loss' (nats per masked slot, mean over
    its iterations) and ``iter['ptx_loss']``. The supervised batch is replicated on the mesh (it is
    small: the step's P prompts).
  """
  if not isinstance(config, HTGRPOConfig):
    raise ValueError(f"config must be an HTGRPOConfig, got {type(config).__name__}")
  sched = hierarchy.stage_schedule(config.n_global, config.n_struct, config.n_refine)
  groups = estimators.canvas_groups(config)
  n_distinct = max(groups) + 1
  representative = tuple(groups.index(d) for d in range(n_distinct))
  use_ref = config.beta > 0
  ptx_logits_fn = supervised_logits_fn or canvas_logits_fn

  def logp_passes(params, prompts_mb, tokens_mb, canvases, nmb):
    """Stop-gradient log-probs of the rollout tokens on each canvas: [D, B, N] from canvases [D, B, N]."""

    def one(canvas):
      def mb(xs):
        p, c, t = xs
        return token_logp_entropy(canvas_logits_fn(params, p, c), t)[0]

      out = jax.lax.map(mb, (prompts_mb, _split_mb(canvas, nmb), tokens_mb))
      return out.reshape(canvas.shape)

    return jax.lax.stop_gradient(jax.lax.map(one, canvases))

  def step_fn(state: TrainState, rollout: Rollout, key: jax.Array, supervised=None):
    bsz, _ = rollout.image_tokens.shape
    nmb = config.micro_batches(bsz)
    tokens = rollout.image_tokens
    step_key = jax.random.fold_in(key, state.step)
    sets = update_sets(config, rollout, step_key)
    tok_adv, is_s, w, stage_credit = sets.token_adv, sets.is_structure, sets.credit, sets.stage_credit
    canvases, loss_masks, replay_w = sets.canvases, sets.loss_masks, sets.replay_weights

    # Old/ref passes once per distinct canvas: for 'htgrpo' the global and struct iterations all score the
    # same all-mask canvas (and refine iterations the same S-revealed one), so this is 1-2 forwards, not K.
    prompts_mb, tokens_mb = _split_mb(rollout.prompt_tokens, nmb), _split_mb(tokens, nmb)
    distinct = canvases[jnp.asarray(representative)]
    gather = jnp.asarray(groups)
    # Adapter training (state.frozen): the reference is the frozen base with the adapters off,
    # and neither these passes nor the rollouts see dropout (no rng).
    old_distinct = logp_passes(state.policy_params(), prompts_mb, tokens_mb, distinct, nmb)
    old = old_distinct[gather]
    ref = logp_passes(state.reference_params(), prompts_mb, tokens_mb, distinct, nmb)[gather] if use_ref else None
    frozen = state.frozen
    counts = loss_masks.sum(axis=(1, 2)).astype(jnp.float32)

    def inner(carry, xs):
      params, opt_state, skipped = carry
      canvas, lmask, old_k, ref_k, count, rw_k, k = xs
      drop_key = jax.random.fold_in(jax.random.fold_in(step_key, k), _DROPOUT_SALT)
      denom = jnp.maximum(count, 1.0)
      w_k = hierarchy.loss_set_credit(w, lmask) if stage_credit else w
      token_adv = tok_adv * w_k * rw_k[:, None]

      def mb_grad(mxs):
        p, c, t, lm, o, r, a, wk, m = mxs
        rng = None if frozen is None else jax.random.fold_in(drop_key, m)

        def loss_fn(prm):
          # Only ``params`` are differentiated: with a frozen base they are the adapters.
          logp, ent = token_logp_entropy(canvas_logits_fn(policy_params(frozen, prm, rng), p, c), t)
          lsum, _, met = ht_grpo_loss(
              logp,
              o,
              r,
              a,
              lm,
              clip_eps=config.clip_eps,
              beta=config.beta,
              entropy=ent,
              credit=wk,
              entropy_coef=config.entropy_coef,
          )
          return lsum / denom, met

        return jax.grad(loss_fn, has_aux=True)(params)

      mxs = (
          prompts_mb,
          _split_mb(canvas, nmb),
          tokens_mb,
          _split_mb(lmask, nmb),
          _split_mb(old_k, nmb),
          _split_mb(ref_k, nmb),
          _split_mb(token_adv, nmb),
          _split_mb(w_k, nmb),
          jnp.arange(nmb),
      )
      first = jax.tree.map(lambda x: x[0], mxs)
      grads, met = mb_grad(first)
      if nmb > 1:

        def acc(c, mx):
          g, m = mb_grad(mx)
          return (jax.tree.map(jnp.add, c[0], g), combine_metrics(c[1], m)), None

        (grads, met), _ = jax.lax.scan(acc, (grads, met), jax.tree.map(lambda x: x[1:], mxs))

      if supervised is not None:
        ptx_key = jax.random.fold_in(jax.random.fold_in(step_key, k), _PTX_SALT)
        ptx_rng = None if frozen is None else jax.random.fold_in(drop_key, nmb)  # after the micro-batches'

        def ptx_fn(prm):
          canvas, masked = sup_lib.mask_canvas(supervised.codes, ptx_key)
          logits = ptx_logits_fn(policy_params(frozen, prm, ptx_rng), supervised.prompt_tokens, canvas)
          total, n = sup_lib.masked_token_nll(logits, supervised.codes, masked)
          return total / jnp.maximum(n, 1.0)

        ptx_loss, ptx_grads = jax.value_and_grad(ptx_fn)(params)
        grads = jax.tree.map(lambda g, h: g + config.ptx_coef * h.astype(g.dtype), grads, ptx_grads)
      else:
        ptx_loss = jnp.float32(0.0)
      grad_norm = optax.tree.norm(grads)
      updates, new_opt = optimizer.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      # A finite loss and gradient can still give a non-finite update (an infinite learning rate, a
      # NaN weight decay, a gradient whose square overflows Adam's second moment); writing it would
      # poison every later step, so what would be written is checked too.
      ok = jnp.isfinite(met["loss"] + ptx_loss) & _all_finite(grads) & _all_finite(new_params) & _all_finite(new_opt)
      keep = lambda new, old_: jax.tree.map(lambda n, o_: jnp.where(ok, n, o_), new, old_)
      params, opt_state = keep(new_params, params), keep(new_opt, opt_state)
      met = dict(met, grad_norm=grad_norm, ptx_loss=ptx_loss, skipped=(~ok).astype(jnp.int32))
      return (params, opt_state, skipped + (~ok).astype(jnp.int32)), met

    (params, opt_state, skipped), per_iter = jax.lax.scan(
        inner,
        (state.params, state.opt_state, state.skipped),
        (canvases, loss_masks, old, ref, counts, replay_w, jnp.arange(len(sched))),
    )

    metrics = {}
    for name, ks in [("total", tuple(range(len(sched))))] + [
        (STAGE_NAMES[s], tuple(k for k, st in enumerate(sched) if st == s)) for s in sorted(set(sched))
    ]:
      idx = jnp.asarray(ks)
      sums = {k: v[idx].sum() for k, v in per_iter.items() if k not in ("ratio_min", "ratio_max", "ptx_loss")}
      sums["ratio_min"], sums["ratio_max"] = per_iter["ratio_min"][idx].min(), per_iter["ratio_max"][idx].max()
      m = finalize_metrics(sums, counts[idx].sum())
      m["grad_norm"] = per_iter["grad_norm"][idx].mean()
      m["skipped"] = per_iter["skipped"][idx].sum()
      if supervised is not None:
        m["ptx_loss"] = per_iter["ptx_loss"][idx].mean()
      metrics[name] = m
    metrics["iter"] = {
        "ratio_min": per_iter["ratio_min"],
        "ratio_max": per_iter["ratio_max"],
        "loss": per_iter["loss"] / jnp.maximum(counts, 1.0),
        "kl": per_iter["kl"] / jnp.maximum(counts, 1.0),
        "tokens": counts,
        "grad_norm": per_iter["grad_norm"],
        "skipped": per_iter["skipped"],
    }
    if supervised is not None:
      metrics["iter"]["ptx_loss"] = per_iter["ptx_loss"]
    metrics["reward_mean"] = rollout.rewards.mean()
    metrics["reward_std"] = rollout.rewards.std()
    # M == 1: every row is one advantage; its [B] mean keeps the metric bitwise as before.
    metrics["adv_abs_mean"] = jnp.abs(tok_adv[:, 0] if config.num_sketches == 1 else tok_adv).mean()
    metrics["structure_frac"] = is_s.astype(jnp.float32).mean()
    cand = (rollout.commit_step >= 0) & (rollout.commit_step < config.sketch_steps)
    n_s, n_c = is_s.sum(axis=-1), cand.sum(axis=-1)
    metrics["structure_selectivity"] = (n_s / jnp.maximum(n_c, 1)).astype(jnp.float32).mean()
    metrics["structure_all_candidates_frac"] = (n_s == n_c).astype(jnp.float32).mean()
    metrics["behaviour_gap"], metrics["behaviour_gap_tokens"] = behaviour_gap(
        distinct, old_distinct, rollout.commit_step, rollout.commit_logp, config.num_sampler_steps
    )
    metrics["skipped"] = metrics["total"]["skipped"]
    metrics["skipped_total"] = skipped
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, skipped=skipped)
    return new_state, metrics

  donate_argnums = (0,) if donate else ()
  if mesh is None:
    jitted = jax.jit(step_fn, donate_argnums=donate_argnums)
  else:
    mesh = parallel.auto_mesh(mesh)
    rep = parallel.replicated(mesh)
    st = _retarget(state_shardings, mesh) if state_shardings is not None else rep
    jitted = jax.jit(
        step_fn,
        in_shardings=(st, rollout_shardings(mesh), rep, rep),
        out_shardings=(st, rep),
        donate_argnums=donate_argnums,
    )
  return TrainStep(jitted, config, mesh)
