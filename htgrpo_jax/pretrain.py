"""Masked-diffusion pretraining of the ShapeEval base policy on (caption, image tokens) pairs.

Objective (MaskGIT / LLaDA-style): per example draw t ~ U(0, 1], mask ceil(t * N) of the N image
slots at random, and minimise the cross-entropy over the C codebook entries at the masked slots
(token mean over the batch). With probability ``p_uncond`` an example's prompt is replaced by the
layout's unconditional prompt, so the same network serves classifier-free guidance.

``make_train_step`` is one jitted, donated AdamW step; ``pretrain`` is the loop used by
``launch/pretrain.py`` (world assets -> model -> steps -> Orbax checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util

from htgrpo_jax import contracts, paths, runtime
from htgrpo_jax.contracts import CanvasLogitsFn, TrainState
from htgrpo_jax.models import layouts, llada, policy
from htgrpo_jax.contracts import mask_canvas, mask_random_slots, masked_token_nll  # noqa: F401 (re-exported)
from htgrpo_jax.worlds.shapeeval import dataset as world_data
from htgrpo_jax.worlds.shapeeval.scenes import WorldConfig

_now = time.monotonic  # the safety cap's clock (a module attribute so tests can slow it down)

# The learner state is the package's one ``TrainState`` (contracts.py); pretraining keeps no
# reference policy (``ref_params`` None: ``TrainState.create(params, opt, with_reference=False)``).
# Only the params are written to disk (``save_params``), so the state's layout is not a file format.


RECIPE_FILE = "pretrain.json"  # next to {workdir}/params: what made the base policy


def recipe(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The settings of a pretraining config that decide the base policy's params (not where it is
  written, logged or evaluated): seed, steps, batch, optimizer, prompt dropout, model and world."""
  world = {k: v for k, v in cfg.world.to_dict().items() if k != "data_dir"}
  model = dict(cfg.model.to_dict(), overrides=dict(cfg.model.get("overrides") or {}))
  keys = ("seed", "num_steps", "batch_size", "p_uncond")
  return json.loads(json.dumps(dict({k: cfg[k] for k in keys}, optim=cfg.optim.to_dict(), model=model, world=world)))


def recipe_mismatch(cfg: ml_collections.ConfigDict) -> list[str] | None:
  """How the base policy already at ``{cfg.workdir}`` was made differently from ``cfg``, the seed
  aside: one 'key: recorded -> asked' line per differing setting ([] when the same); None when the
  checkpoint has no record (pretrained before records were written, or not by ``pretrain``)."""
  path = paths.join(cfg.workdir, RECIPE_FILE)
  if not paths.isfile(path):
    return None
  with paths.open(path) as f:
    made = json.load(f)["recipe"]

  # Not the seed: a training run's seed is its own (a study trains every seed from one frozen base).
  made, asked = (traverse_util.flatten_dict(d, sep=".") for d in (made, recipe(cfg)))
  keys = sorted((made.keys() | asked.keys()) - {"seed"})
  return [f"{k}: {made.get(k, '(unset)')} -> {asked.get(k, '(unset)')}" for k in keys if made.get(k) != asked.get(k)]


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping + AdamW at the peak learning rate; ``lr_scale`` (see ``make_train_step``)
  applies the schedule, which ``pretrain`` computes on the host."""
  if cfg.warmup_steps < 0 or cfg.learning_rate <= 0 or not 0.0 <= cfg.final_lr_fraction <= 1.0:
    raise ValueError(
        f"optim: need warmup_steps >= 0, learning_rate > 0, 0 <= final_lr_fraction "
        f"<= 1; got {cfg.warmup_steps}, {cfg.learning_rate}, {cfg.final_lr_fraction}"
    )
  return contracts.make_optimizer(
      cfg.learning_rate, clip_norm=cfg.max_grad_norm or None, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay
  )


def lr_scale(step: int, progress: float, warmup_steps: int, final_fraction: float) -> float:
  """Multiplier of the peak learning rate: linear warmup over ``warmup_steps``, then cosine decay
  to ``final_fraction`` as ``progress`` goes 0 -> 1.

  ``pretrain`` passes progress = step / num_steps: the schedule depends on the step count alone,
  so the same seed and software give the same base policy on any machine, however loaded.
  """
  warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
  cos = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
  return warm * (final_fraction + (1.0 - final_fraction) * cos)


HELDOUT_MASK_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def heldout_loss(
    params: Any,
    canvas_logits_fn: CanvasLogitsFn,
    assets: world_data.WorldAssets,
    layout: layouts.EmbeddedLayout,
    batch_size: int = 100,
    fractions: tuple[float, ...] = HELDOUT_MASK_FRACTIONS,
    seed: int = 0,
) -> dict[str, float]:
  """The base policy's masked-token cross-entropy on the world's held-out ('eval') split: every
  record once, conditioned on its caption, at each masked fraction in ``fractions`` (the same slots
  for every policy: the masks come from ``seed``). A deterministic, low-noise measure of the model
  itself, beside the judge's score of its samples (which moves with sampling noise and the
  sampler's settings).

  Returns:
    {'heldout_loss': mean over the fractions, 'heldout_loss@0.25': ..., ...} in nats per masked slot.
  """
  ds = world_data.make_dataset(
      assets, "eval", batch_size, seed=seed, shuffle=False, num_epochs=1, encode_prompts=layout.encode_prompts
  )

  @jax.jit
  def batch_sums(params, prompts, codes, key):
    n = codes.shape[1]
    out = []
    for i, f in enumerate(fractions):
      canvas, masked = mask_random_slots(codes, jax.random.fold_in(key, i), max(1, math.ceil(f * n)))
      logits = canvas_logits_fn(params, prompts, canvas).astype(jnp.float32)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, codes)
      out.append(jnp.stack([jnp.sum(ce * masked), jnp.sum(masked)]))
    return jnp.stack(out)  # [F, 2]: summed loss, masked slots

  key = jax.random.PRNGKey(seed)
  total = None
  for j, batch in enumerate(ds):
    prompts, codes = jnp.asarray(batch["prompt_tokens"]), jnp.asarray(batch["codes"])
    sums = batch_sums(params, prompts, codes, jax.random.fold_in(key, j))
    total = sums if total is None else total + sums
  if total is None:
    raise ValueError(f"heldout_loss: the eval split has fewer than batch_size={batch_size} records")
  per = [float(t[0] / t[1]) for t in total]
  return dict({"heldout_loss": float(np.mean(per))}, **{f"heldout_loss@{f:g}": v for f, v in zip(fractions, per)})


def masked_diffusion_loss(
    params: Any,
    canvas_logits_fn: CanvasLogitsFn,
    prompt_tokens: jax.Array,
    uncond_tokens: jax.Array,
    codes: jax.Array,
    key: jax.Array,
    p_uncond: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy at masked slots.

  Args:
    params: policy params.
    canvas_logits_fn: (params, int32[B, Lp], int32[B, N]) -> float32[B, N, C].
    prompt_tokens: int32[B, Lp]; uncond_tokens: int32[B, Lp] (the CFG prompt).
    codes: int32[B, N] target codes.
    key: PRNG key (mask and prompt dropout).
    p_uncond: probability of training a row unconditionally.

  Returns:
    (scalar loss, metrics {'loss', 'accuracy', 'mask_fraction'}).
  """
  k_mask, k_drop = jax.random.split(key)
  canvas, masked = mask_canvas(codes, k_mask)
  drop = jax.random.bernoulli(k_drop, p_uncond, (codes.shape[0], 1))
  prompts = jnp.where(drop, uncond_tokens, prompt_tokens)
  logits = canvas_logits_fn(params, prompts, canvas).astype(jnp.float32)
  total, count = masked_token_nll(logits, codes, masked)
  loss = total / count
  w = masked.astype(jnp.float32)
  acc = jnp.sum((jnp.argmax(logits, -1) == codes) * w) / count
  return loss, {"loss": loss, "accuracy": acc, "mask_fraction": jnp.mean(w)}


def make_train_step(
    canvas_logits_fn: CanvasLogitsFn, optimizer: optax.GradientTransformation, p_uncond: float
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """``step(state, prompt_tokens, uncond_tokens, codes, key, lr_scale) -> (state, metrics)``,
  jitted with the state (a ``TrainState`` without reference params) donated; ``lr_scale`` (float32
  scalar) multiplies the optimizer's update, which for AdamW is exactly a learning rate of
  ``lr_scale * learning_rate`` (decay included). A non-finite loss or gradient skips the update
  (``metrics['skipped']`` this step, ``state.skipped`` in total)."""
  if not 0.0 <= p_uncond < 1.0:
    raise ValueError(f"p_uncond={p_uncond} must be in [0, 1)")

  def step(state, prompt_tokens, uncond_tokens, codes, key, lr_scale=1.0):
    (loss, metrics), grads = jax.value_and_grad(masked_diffusion_loss, has_aux=True)(
        state.params, canvas_logits_fn, prompt_tokens, uncond_tokens, codes, key, p_uncond
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: (u * lr_scale).astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    skipped = 1 - ok.astype(jnp.int32)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), skipped=skipped)
    return (
        state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            skipped=state.skipped + skipped,
        ),
        metrics,
    )

  return jax.jit(step, donate_argnums=0)


def build_policy(
    cfg: ml_collections.ConfigDict, assets: world_data.WorldAssets
) -> tuple[llada.LLaDAConfig, layouts.EmbeddedLayout]:
  """The model config and layout for the world (vocab and pad id come from the layout)."""
  world = world_config(cfg)
  layout = layouts.EmbeddedLayout(
      assets.tokenizer,
      grid=(world.grid, world.grid),
      codebook_size=int(assets.codebook.shape[0]),
      prompt_length=cfg.model.prompt_length,
  )
  overrides = dict(cfg.model.overrides) if "overrides" in cfg.model else {}
  model_cfg = llada.get_config(cfg.model.preset, use_pad_mask=True, pad_id=layout.pad_id, **overrides)
  return model_cfg, layout


def world_config(cfg: ml_collections.ConfigDict) -> WorldConfig:
  return WorldConfig(canvas=cfg.world.canvas, patch=cfg.world.patch, snap=cfg.world.snap)


def save_params(path: str | os.PathLike, params: Any) -> str:
  """Writes params with Orbax (StandardCheckpointer) to ``path`` (made absolute; a URL is kept);
  returns it."""
  path = paths.resolve(path)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(path, params, force=True)
  ckpt.wait_until_finished()
  return path


def load_params(path: str | os.PathLike, abstract: Any) -> Any:
  """Reads params saved by ``save_params`` into the structure of ``abstract`` (ShapeDtypeStructs)."""
  path = paths.resolve(path)
  if not paths.isdir(path):
    raise ValueError(f"checkpoint {path!r} does not exist")
  return ocp.StandardCheckpointer().restore(path, abstract)


def world_assets(cfg: ml_collections.ConfigDict) -> world_data.WorldAssets:
  """The world a pretraining config names (built on first use, then read from ``cfg.world.data_dir``)."""
  return world_data.build_world(
      cfg.world.data_dir,
      world_config(cfg),
      seed=cfg.seed,
      num_codes=cfg.world.num_codes,
      num_train=cfg.world.num_train,
      num_eval=cfg.world.num_eval,
  )


def load_pretrained(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The world assets, model config, layout and saved params of a finished pretraining run
  (``{workdir}/params``), in the shape ``pretrain`` returns them (no history)."""
  assets = world_assets(cfg)
  model_cfg, layout = build_policy(cfg, assets)
  path = paths.join(cfg.workdir, "params")
  params = load_params(path, policy.abstract_params(model_cfg, layout))
  return dict(params=params, model_cfg=model_cfg, layout=layout, assets=assets, checkpoint=path)


def pretrain(
    cfg: ml_collections.ConfigDict,
    progress: Callable[[Iterator[int]], Iterator[int]] = lambda it: it,
    log: Callable[[int, dict[str, float]], None] = lambda s, m: None,
) -> dict[str, Any]:
  """Runs pretraining.

  Args:
    cfg: a ``configs/pretrain_shapes.py`` config.
    progress: wraps the step iterator (e.g. ``tqdm``).
    log: called every ``cfg.log_every`` steps with host metrics.

  Returns:
    dict with params, model_cfg, layout, assets, history (list of metric dicts with 'step'),
    steps_done, seconds, checkpoint (path or None), cut_short and ``heldout_loss`` (with its
    per-fraction values; also recorded in ``pretrain.json``).
  """
  if cfg.batch_size < 1 or cfg.num_steps < 1:
    raise ValueError(f"batch_size={cfg.batch_size} and num_steps={cfg.num_steps} must be >= 1")
  assets = world_assets(cfg)
  model_cfg, layout = build_policy(cfg, assets)
  logits_fn = policy.make_canvas_logits_fn(model_cfg, layout)
  key = jax.random.PRNGKey(cfg.seed)
  params = policy.init_params(model_cfg, layout, jax.random.fold_in(key, 0))
  opt = make_optimizer(cfg.optim)
  state = TrainState.create(params, opt, with_reference=False)
  step_fn = make_train_step(logits_fn, opt, cfg.p_uncond)
  ds = world_data.make_dataset(assets, "train", cfg.batch_size, seed=cfg.seed, encode_prompts=layout.encode_prompts)
  it = iter(ds)
  uncond = jnp.asarray(layout.unconditional_prompts(cfg.batch_size))
  history, t0, done, cut_short = [], _now(), 0, False
  # The wall clock is only a safety cap: the schedule and the stopping point are step counts, so the
  # base policy is reproducible. Hitting the cap is reported loudly (and recorded), never silent.
  budget = cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
  for s in progress(iter(range(cfg.num_steps))):
    batch = next(it)
    scale = lr_scale(s, s / cfg.num_steps, cfg.optim.warmup_steps, cfg.optim.final_lr_fraction)
    state, m = step_fn(
        state,
        jnp.asarray(batch["prompt_tokens"]),
        uncond,
        jnp.asarray(batch["codes"]),
        jax.random.fold_in(key, s + 1),
        jnp.float32(scale),
    )
    done = s + 1
    if done % cfg.log_every == 0 or done == cfg.num_steps:
      host = {k: float(v) for k, v in m.items()}
      history.append(dict(host, step=done, seconds=_now() - t0, lr=scale * cfg.optim.learning_rate))
      log(done, host)
    if done < cfg.num_steps and _now() - t0 > budget:
      cut_short = True
      warnings.warn(
          f"pretraining hit its safety cap max_minutes={cfg.max_minutes:g} after {done} of "
          f"{cfg.num_steps} steps: this base policy is NOT the reproducible one (its "
          "learning rate never annealed). Raise max_minutes (<= 0 disables the cap).",
          stacklevel=2,
      )
      break
  params = jax.block_until_ready(state.params)
  seconds = _now() - t0
  ckpt = None
  held = heldout_loss(params, logits_fn, assets, layout, batch_size=min(100, cfg.world.num_eval))
  if cfg.workdir:
    ckpt = save_params(paths.join(cfg.workdir, "params"), params)
    record = dict(recipe=recipe(cfg), steps_done=done, cut_short=cut_short, seconds=round(seconds, 1), **held)
    record["made_on"] = runtime.machine()  # the same recipe gives other params on another CPU kind
    paths.write_text_atomic(paths.join(cfg.workdir, RECIPE_FILE), json.dumps(record, indent=2))
  return dict(
      params=params,
      model_cfg=model_cfg,
      layout=layout,
      assets=assets,
      history=history,
      steps_done=done,
      seconds=seconds,
      checkpoint=ckpt,
      cut_short=cut_short,
      **held,
  )
