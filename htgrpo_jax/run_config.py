"""A training config, validated and planned: pure functions of the config (no files, no devices
touched except to read a mesh's shape, no host side effects).

``plan(config)`` turns the ConfigDict into a frozen ``Plan`` (typed ``HTGRPOConfig`` and
``SamplerConfig``), naming the config key of every broken constraint; ``check_mesh`` adds the
constraints a mesh puts on the batch sizes; ``profile_window`` reads the steps to trace. The
optimizer, the train state's shardings and its abstract (unallocated) shape are derived here too,
so the trainer, ``evaluate_run`` and the AOT pre-flight build the same objects from one config.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Callable

import jax
import ml_collections
import numpy as np
import optax

from htgrpo_jax import parallel, rl
from htgrpo_jax.models import lora, policy
from htgrpo_jax.sampling import CacheConfig, SamplerConfig

if TYPE_CHECKING:  # the Task type only (tasks imports the worlds, grain, the models)
  from htgrpo_jax import tasks

_EVAL_SALT = 0x5EED_E7A1  # eval keys are fixed per run (the same prompts and noise every eval)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The validated, static parts of a training config.

  ``sampler`` is the config's sampler (evaluation; with ``eval.sampler_cache`` its rollout cache);
  ``rollout_sampler`` draws the training rollouts: the same one without the cache, and without CFG
  under ``rl.estimator_guidance='unguided_rollouts'`` (None: the same).
  """

  rl: rl.HTGRPOConfig
  sampler: SamplerConfig
  prompts_per_step: int
  batch_size: int
  eval_batch_size: int
  share_sketch: bool = False
  rollout_sampler: SamplerConfig | None = None
  rollout_chunks: int = 1  # ``rollout.chunks``: the step's prompts sampled in this many parts
  reward_in_flight: int = 2  # ``rollout.max_in_flight``: parts scored at once (0: no overlap)

  def __post_init__(self):
    if self.rollout_sampler is None:
      object.__setattr__(self, "rollout_sampler", self.sampler)

  @property
  def sketch_rows(self) -> int:
    """Rows of the sketch batch with ``share_sketch``: prompts_per_step x rl.num_sketches."""
    return self.prompts_per_step * self.rl.num_sketches

  @property
  def chunk_prompts(self) -> int:
    """Prompts per rollout part: prompts_per_step / rollout.chunks."""
    return self.prompts_per_step // self.rollout_chunks


def plan(config: ml_collections.ConfigDict) -> Plan:
  """Validates a training config without touching JAX devices or files.

  Raises:
    ValueError: naming the config key and the constraint it breaks.
  """

  def need(ok: bool, key: str, msg: str):
    if not ok:
      raise ValueError(f"{key}={config_get(config, key)!r}: {msg}")

  for key in (
      "total_steps",
      "prompts_per_step",
      "log_every",
      "eval_every",
      "save_every",
      "keep_checkpoints",
      "eval.num_prompts",
      "eval.batch_size",
  ):
    v = config_get(config, key)
    need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, key, "must be an int >= 1")
  need(config.eval.grid_size >= 0, "eval.grid_size", "must be >= 0")
  validate_optim(config)
  validate_run_keys(config)
  lora.from_config(config.get("model") or {})  # model.lora.* (named) before anything is built
  need(config.rl.preset in rl.PRESETS, "rl.preset", f"must be one of {tuple(rl.PRESETS)}")
  sampler = dict(config.sampler)
  share = sampler.pop("share_sketch", False)
  if share:
    # One shared sketch per prompt cancels the sketch tokens' gradient exactly (the G images hold the
    # same tokens on the same canvas and their advantages sum to 0): branch M >= 2 sketches per prompt.
    m, g = config.rl.get("num_sketches"), config.rl.group_size
    m = 1 if m is None else m
    if not isinstance(m, int) or m < 2:
      raise ValueError(
          f"sampler.share_sketch=True needs rl.num_sketches >= 2, got rl.num_sketches={m!r}: "
          "with one sketch per prompt all G images share its tokens and their group-relative "
          "advantages sum to 0, so the sketch tokens get no gradient"
      )
    if isinstance(g, int) and (g % m or g // m < 2):
      raise ValueError(
          f"sampler.share_sketch=True with rl.num_sketches={m}: rl.group_size={g} must split "
          f"into {m} sketches of at least 2 paints each (rl.group_size / rl.num_sketches >= 2)"
      )
  overrides = {k: v for k, v in config.rl.items() if k not in ("preset", "group_size") and v is not None}
  try:
    rl_cfg = rl.preset(
        config.rl.preset, group_size=config.rl.group_size, num_sampler_steps=config.sampler.num_steps, **overrides
    )
  except TypeError as e:
    raise ValueError(f"rl: {e}") from None
  except ValueError as e:  # HTGRPOConfig names the field; say where it lives in the config
    raise ValueError(f"rl: {e}") from None
  if not share and rl_cfg.num_sketches > 1:
    raise ValueError(
        f"rl.num_sketches={rl_cfg.num_sketches} needs sampler.share_sketch=True: sketch-level "
        "advantages assume each group is num_sketches sketches x group_size / num_sketches "
        "paints that share them"
    )
  if not sampler.get("sketch_steps"):
    # The sampler's sketch phase is the algorithm's: structure tokens are those it commits.
    sampler["sketch_steps"] = rl_cfg.sketch_steps
  elif sampler["sketch_steps"] != rl_cfg.sketch_steps:
    raise ValueError(
        f"sampler.sketch_steps={sampler['sketch_steps']} disagrees with rl.sketch_fraction="
        f"{rl_cfg.sketch_fraction} (the partition's sketch window, ceil({rl_cfg.sketch_fraction} * "
        f"sampler.num_steps={rl_cfg.num_sampler_steps}) = {rl_cfg.sketch_steps} steps): structure "
        f"candidates and sketch-level advantages would not be the tokens the sampler sketches; set "
        f"sampler.sketch_steps=0 (derived) or {rl_cfg.sketch_steps}, or change rl.sketch_fraction"
    )
  cache = sampler.get("cache") or {}
  if cache and cache.get("enabled"):
    raise ValueError(
        "sampler.cache.enabled=True: training rollouts cannot use the rollout cache (the RL "
        "importance ratios score the policy without it, and a cached step draws from another "
        "distribution); set eval.sampler_cache.enabled=True to use it for evaluations only"
    )
  try:
    s_cfg = SamplerConfig.from_mapping(sampler)
  except ValueError as e:
    raise ValueError(f"sampler: {e}") from None
  eval_cache = eval_sampler_cache(config)
  if share and s_cfg.sketch_steps >= s_cfg.num_steps:
    raise ValueError("sampler.share_sketch needs sampler.sketch_steps < sampler.num_steps")
  batch = config.prompts_per_step * rl_cfg.group_size
  try:
    rl_cfg.validate_batch(batch)
  except ValueError as e:
    raise ValueError(f"rl.micro_batch_size / prompts_per_step: {e}") from None
  chunks, in_flight = rollout_keys(config)
  if config.prompts_per_step % chunks:
    raise ValueError(
        f"rollout.chunks={chunks}: must divide prompts_per_step={config.prompts_per_step} "
        "(each part holds whole prompt groups)"
    )
  # 'unguided_rollouts': rollouts from the policy the estimator scores; CFG stays for evaluation.
  roll_cfg = dataclasses.replace(s_cfg, cfg_scale=0.0) if rl_cfg.estimator_guidance == "unguided_rollouts" else s_cfg
  # The rollout cache (``eval.sampler_cache``) serves the evaluation sampler only; rollouts stay exact.
  s_cfg = dataclasses.replace(s_cfg, cache=eval_cache)
  return Plan(
      rl=rl_cfg,
      sampler=s_cfg,
      prompts_per_step=config.prompts_per_step,
      batch_size=batch,
      eval_batch_size=config.eval.batch_size,
      share_sketch=bool(share),
      rollout_sampler=roll_cfg,
      rollout_chunks=chunks,
      reward_in_flight=in_flight,
  )


def eval_sampler_cache(config: ml_collections.ConfigDict) -> CacheConfig:
  """``eval.sampler_cache`` (optional; off when absent) as a ``CacheConfig``: the rollout cache of the
  evaluation sampler (docs/performance.md, "Rollout cache"). Training rollouts never use it.

  Raises:
    ValueError: naming the ``eval.sampler_cache.*`` key at fault.
  """
  m = (config.get("eval") or {}).get("sampler_cache") or {}
  try:
    return CacheConfig.from_mapping({k: m[k] for k in m.keys()})
  except (ValueError, TypeError) as e:
    raise ValueError(str(e).replace("SamplerConfig.cache", "eval.sampler_cache")) from None


def rollout_keys(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """``rollout.chunks`` (int >= 1, default 1) and ``rollout.max_in_flight`` (int >= 0, default 2)
  of a config (the block is optional).

  Raises:
    ValueError: naming the key.
  """
  r = config.get("rollout") or {}
  unknown = sorted(set(r) - {"chunks", "max_in_flight"})
  if unknown:
    raise ValueError(f"rollout.{unknown[0]}: not a rollout setting (known: chunks, max_in_flight)")
  chunks, in_flight = r.get("chunks", 1), r.get("max_in_flight", 2)
  if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
    raise ValueError(f"rollout.chunks={chunks!r}: must be an int >= 1")
  if isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight < 0:
    raise ValueError(f"rollout.max_in_flight={in_flight!r}: must be an int >= 0 (0: no overlap)")
  return chunks, in_flight


def config_get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def check_mesh(p: Plan, mesh: jax.sharding.Mesh) -> None:
  div = parallel.batch_size_divisor(mesh)
  if p.batch_size % div:
    raise ValueError(
        f"prompts_per_step * rl.group_size = {p.batch_size} is not a multiple of the "
        f"mesh's data*fsdp = {div} (mesh={dict(mesh.shape)})"
    )
  if p.share_sketch and p.sketch_rows % div:
    # M sketches per prompt: the sketch batch is prompts_per_step * M rows, sharded like any batch.
    raise ValueError(
        f"prompts_per_step * rl.num_sketches = {p.sketch_rows} sketch rows is not a multiple "
        f"of the mesh's data*fsdp = {div}, which sampler.share_sketch=True needs"
    )
  if p.rollout_chunks > 1:
    rows = p.chunk_prompts * (p.rl.num_sketches if p.share_sketch else p.rl.group_size)
    if rows % div:
      raise ValueError(
          f"rollout.chunks={p.rollout_chunks}: a part of {p.chunk_prompts} prompts samples "
          f"{rows} rows, not a multiple of the mesh's data*fsdp = {div}"
      )
  mb = p.rl.micro_batch_size
  if mb and mb % div:
    raise ValueError(
        f"rl.micro_batch_size={mb} is not a multiple of the mesh's data*fsdp = {div} "
        f"(each micro-batch is split over the batch axes)"
    )
  if p.eval_batch_size % div:
    raise ValueError(f"eval.batch_size={p.eval_batch_size} is not a multiple of the mesh's " f"data*fsdp = {div}")


OPTIM_KEYS = ("learning_rate", "warmup_steps", "max_grad_norm", "weight_decay", "b1", "b2", "eps")
# Optional, with these defaults: after warm-up the learning rate stays constant, or decays on a
# cosine to ``final_lr_fraction`` x the peak at ``total_steps``.
OPTIM_DEFAULTS = dict(eps=1e-8, decay="constant", final_lr_fraction=0.0)
DECAYS = ("constant", "cosine")


def validate_optim(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Checks every ``optim.*`` key (unknown ones too); returns them, ``OPTIM_DEFAULTS`` filled in.

  Raises:
    ValueError: naming the key, its value and the constraint it breaks.
  """
  o = dict(config.optim)
  unknown = sorted(set(o) - set(OPTIM_KEYS) - set(OPTIM_DEFAULTS))
  if unknown:
    known = ", ".join(OPTIM_KEYS + tuple(k for k in OPTIM_DEFAULTS if k not in OPTIM_KEYS))
    raise ValueError(f"optim.{unknown[0]}: not an optimizer setting (known: {known})")
  for key, value in OPTIM_DEFAULTS.items():
    o.setdefault(key, value)
  for key in OPTIM_KEYS[:-1]:
    if key not in o:
      raise ValueError(f"optim.{key}: missing (every config needs {', '.join(OPTIM_KEYS[:-1])})")

  def need(ok: bool, key: str, msg: str):
    if not ok:
      raise ValueError(f"optim.{key}={o[key]!r}: {msg}")

  def number(key: str, none_ok: bool = False) -> bool:
    v = o[key]
    return (none_ok and v is None) or (isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v))

  need(number("learning_rate") and o["learning_rate"] > 0, "learning_rate", "must be a finite number > 0")
  w = o["warmup_steps"]
  need(isinstance(w, int) and not isinstance(w, bool) and w >= 0, "warmup_steps", "must be an int >= 0 (RL steps)")
  # A negative clip norm scales the gradient by a negative factor: silent gradient ascent.
  need(
      number("max_grad_norm", none_ok=True) and (o["max_grad_norm"] or 0) >= 0,
      "max_grad_norm",
      "must be a finite number >= 0 (0 or None: no clipping)",
  )
  need(number("weight_decay") and o["weight_decay"] >= 0, "weight_decay", "must be a finite number >= 0")
  for key in ("b1", "b2"):
    need(number(key) and 0 <= o[key] < 1, key, "must be a number in [0, 1)")
  need(number("eps") and o["eps"] > 0, "eps", "must be a finite number > 0")
  need(o["decay"] in DECAYS, "decay", f"must be one of {DECAYS}")
  need(
      number("final_lr_fraction") and 0 <= o["final_lr_fraction"] <= 1,
      "final_lr_fraction",
      "must be a number in [0, 1] (the last step's learning rate over the peak)",
  )
  if o["decay"] != "constant" and o["warmup_steps"] >= config.total_steps:
    raise ValueError(
        f"optim.warmup_steps={o['warmup_steps']}: a {o['decay']} decay needs it below "
        f"total_steps={config.total_steps}"
    )
  return o


def validate_run_keys(config: ml_collections.ConfigDict) -> None:
  """The run-control keys (optional in a config): ``save_every_minutes`` (number >= 0, 0 = off),
  ``max_consecutive_skips`` (int >= 0, 0 = never stop), ``allow_config_change`` (bool) and
  ``profile_steps`` (``profile_window``)."""
  m = config.get("save_every_minutes", 0)
  if isinstance(m, bool) or not isinstance(m, (int, float)) or not np.isfinite(m) or m < 0:
    raise ValueError(f"save_every_minutes={m!r}: must be a finite number >= 0 (0: off)")
  k = config.get("max_consecutive_skips", 0)
  if isinstance(k, bool) or not isinstance(k, int) or k < 0:
    raise ValueError(f"max_consecutive_skips={k!r}: must be an int >= 0 (0: never stop)")
  a = config.get("allow_config_change", False)
  if not isinstance(a, bool):
    raise ValueError(f"allow_config_change={a!r}: must be True or False")
  profile_window(config)


def profile_window(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """``profile_steps`` ("start,stop", e.g. "5,7"; "" or absent: off) as ``(start, stop)``.

  The trace covers the RL steps with 0-based index in ``[start, stop)``, i.e. it starts before
  step ``start`` runs and stops once step ``stop - 1`` finished (``stop - start`` steps).

  Raises:
    ValueError: not two ints with ``0 <= start < stop``, naming the key.
  """
  text = config.get("profile_steps", "")
  if text is None or (isinstance(text, str) and not text.strip()):
    return None
  try:
    start, stop = (int(v) for v in str(text).split(","))
  except ValueError:
    start = stop = -1
  if not 0 <= start < stop:
    raise ValueError(
        f"profile_steps={text!r}: must be 'start,stop' with 0 <= start < stop (RL "
        "step indices, the trace covers [start, stop)), or '' (off)"
    )
  return start, stop


def learning_rate(config: ml_collections.ConfigDict, p: Plan) -> float | optax.Schedule:
  """The RL learning rate, counted in inner updates (K per RL step): a linear warm-up over
  ``optim.warmup_steps`` RL steps, then constant (``optim.decay='constant'``) or a cosine down to
  ``final_lr_fraction`` x the peak at ``total_steps`` (``'cosine'``; the schedule is tied to
  ``total_steps``, so a resumed run may not extend it: ``workdir.compare_configs``)."""
  return _schedule(validate_optim(config), config.total_steps, p.rl.num_iterations)


def _schedule(o: dict[str, Any], total_steps: int, k: int) -> float | optax.Schedule:
  peak, warm = o["learning_rate"], o["warmup_steps"] * k
  if o["decay"] == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warm, total_steps * k, end_value=peak * o["final_lr_fraction"])
  return optax.linear_schedule(0.0, peak, warm) if warm else peak


def make_optimizer(config: ml_collections.ConfigDict, p: Plan) -> optax.GradientTransformation:
  """AdamW on ``learning_rate(config, p)``, clipped by global norm."""
  o = validate_optim(config)
  lr = _schedule(o, config.total_steps, p.rl.num_iterations)
  return rl.make_optimizer(
      lr, clip_norm=o["max_grad_norm"] or None, weight_decay=o["weight_decay"], b1=o["b1"], b2=o["b2"], eps=o["eps"]
  )


def state_shardings(
    abstract_state: rl.TrainState,
    param_shardings: Any,
    optimizer,
    mesh: jax.sharding.Mesh,
    frozen_shardings: Any = None,
) -> rl.TrainState:
  """Shardings of a ``TrainState``: optimizer moments follow their params, counters replicated;
  a frozen base (LoRA: ``param_shardings`` are the adapters') on ``frozen_shardings``."""
  rep = parallel.replicated(mesh)
  opt = optax.tree_map_params(
      optimizer, lambda _, s: s, abstract_state.opt_state, param_shardings, transform_non_params=lambda _: rep
  )
  return rl.TrainState(
      step=rep,
      params=param_shardings,
      opt_state=opt,
      ref_params=None if abstract_state.ref_params is None else param_shardings,
      skipped=rep,
      frozen=None if abstract_state.frozen is None else frozen_shardings,
  )


def new_state(optimizer: optax.GradientTransformation, p: Plan) -> Callable[..., rl.TrainState]:
  """``(params, frozen=None) -> TrainState``: full fine-tuning keeps a frozen reference copy when the
  KL term is on; with a ``frozen`` base (LoRA) ``params`` are the adapters and the reference is the
  base with them off (no copy)."""
  return functools.partial(rl.TrainState.create, optimizer=optimizer, with_reference=p.rl.beta > 0)


def abstract_train_state(
    task: tasks.Task, p: Plan, optimizer, mesh: jax.sharding.Mesh
) -> tuple[rl.TrainState, rl.TrainState, Any]:
  """(abstract state with target shardings, its shardings, abstract base params); nothing allocated.

  With ``model_cfg.lora`` the state's params are the adapters and ``frozen`` the base."""
  pshard = policy.param_shardings(task.model_cfg, task.layout, mesh)
  abstract_params = policy.abstract_params(task.model_cfg, task.layout, mesh)
  if task.model_cfg.lora is None:
    abstract = jax.eval_shape(new_state(optimizer, p), abstract_params)
    shardings = state_shardings(abstract, pshard, optimizer, mesh)
  else:
    adapters = policy.abstract_adapters(task.model_cfg, task.layout, mesh)
    abstract = jax.eval_shape(new_state(optimizer, p), adapters, frozen=abstract_params)
    shardings = state_shardings(
        abstract, policy.adapter_shardings(task.model_cfg, task.layout, mesh), optimizer, mesh, frozen_shardings=pshard
    )
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return abstract, shardings, abstract_params


def eval_key(config: ml_collections.ConfigDict) -> jax.Array:
  """The evaluation's PRNG key: from ``eval.seed``, not the run's seed, so every run (arm, seed) is
  judged on the same prompts with the same sampling noise and differences between runs are paired."""
  seed = config.eval.get("seed")
  return jax.random.fold_in(jax.random.PRNGKey(config.seed if seed is None else seed), _EVAL_SALT)
