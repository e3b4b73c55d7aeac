"""The HT-GRPO trainer: prompts -> G rollouts each -> decode -> rewards -> one compiled update.

``train(config)`` is what ``launch/train.py`` runs. Per RL step:

  1. P prompts from the task's grain dataset (its iterator state is checkpointed);
  2. the jitted sampler draws G images per prompt (``sampler.share_sketch``: M = rl.num_sketches
     sketches per prompt, each branched into G / M paints), recording each token's commit step,
     entropy and log-prob;
  3. the task's VQ decoder turns codes into pixels on device; the pixels leave the device once,
     for the reward;
  4. rewards (validated, named) complete the ``Rollout``; ``make_train_step``'s single compiled
     function runs the K sketch-then-paint updates;
  5. metrics go to a progress bar, TensorBoard and ``metrics.jsonl``; every ``eval_every`` steps
     the held-out prompts are scored (Markdown table, PNG grid, reward curve); every
     ``save_every`` steps an async Orbax checkpoint holds the train state, the data iterator and
     the loop state, and a restarted run resumes from it.

All randomness of step ``s`` comes from ``fold_in(PRNGKey(seed), s)``, so a resumed run draws
exactly what an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax

from htgrpo_jax import evaluate, parallel, rl, tasks
from htgrpo_jax import workdir as workdir_lib
from htgrpo_jax.checkpoint import RunCheckpointer, step_dirs
from htgrpo_jax.models import policy
from htgrpo_jax.rewards.base import validate_rewards
from htgrpo_jax.sampling import SamplerConfig, guided_canvas_logits_fn, make_sampler

_EVAL_SALT = 0x5EED_E7A1  # eval keys are fixed per run (the same prompts and noise every eval)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The validated, static parts of a training config.

  ``sampler`` is the config's sampler (evaluation); ``rollout_sampler`` draws the training rollouts:
  the same one, or the same without CFG under ``rl.estimator_guidance='unguided_rollouts'`` (None:
  the same).
  """
  rl: rl.HTGRPOConfig
  sampler: SamplerConfig
  prompts_per_step: int
  batch_size: int
  eval_batch_size: int
  share_sketch: bool = False
  rollout_sampler: SamplerConfig | None = None

  def __post_init__(self):
    if self.rollout_sampler is None:
      object.__setattr__(self, "rollout_sampler", self.sampler)

  @property
  def sketch_rows(self) -> int:
    """Rows of the sketch batch with ``share_sketch``: prompts_per_step x rl.num_sketches."""
    return self.prompts_per_step * self.rl.num_sketches


def plan(config: ml_collections.ConfigDict) -> Plan:
  """Validates a training config without touching JAX devices or files.

  Raises:
    ValueError: naming the config key and the constraint it breaks.
  """
  def need(ok: bool, key: str, msg: str):
    if not ok:
      raise ValueError(f"{key}={config_get(config, key)!r}: {msg}")

  for key in ("total_steps", "prompts_per_step", "log_every", "eval_every", "save_every",
              "keep_checkpoints", "eval.num_prompts", "eval.batch_size"):
    v = config_get(config, key)
    need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, key, "must be an int >= 1")
  need(config.eval.grid_size >= 0, "eval.grid_size", "must be >= 0")
  validate_optim(config)
  validate_run_keys(config)
  need(config.rl.preset in rl.PRESETS, "rl.preset", f"must be one of {tuple(rl.PRESETS)}")
  sampler = dict(config.sampler)
  share = sampler.pop("share_sketch", False)
  if share:
    # One shared sketch per prompt cancels the sketch tokens' gradient exactly (the G images hold the
    # same tokens on the same canvas and their advantages sum to 0): branch M >= 2 sketches per prompt.
    m, g = config.rl.get("num_sketches"), config.rl.group_size
    m = 1 if m is None else m
    if not isinstance(m, int) or m < 2:
      raise ValueError(f"sampler.share_sketch=True needs rl.num_sketches >= 2, got rl.num_sketches={m!r}: "
                       "with one sketch per prompt all G images share its tokens and their group-relative "
                       "advantages sum to 0, so the sketch tokens get no gradient")
    if isinstance(g, int) and (g % m or g // m < 2):
      raise ValueError(f"sampler.share_sketch=True with rl.num_sketches={m}: rl.group_size={g} must split "
                       f"into {m} sketches of at least 2 paints each (rl.group_size / rl.num_sketches >= 2)")
  overrides = {k: v for k, v in config.rl.items()
               if k not in ("preset", "group_size") and v is not None}
  try:
    rl_cfg = rl.preset(config.rl.preset, group_size=config.rl.group_size,
                       num_sampler_steps=config.sampler.num_steps, **overrides)
  except TypeError as e:
    raise ValueError(f"rl: {e}") from None
  except ValueError as e:  # HTGRPOConfig names the field; say where it lives in the config
    raise ValueError(f"rl: {e}") from None
  if not share and rl_cfg.num_sketches > 1:
    raise ValueError(f"rl.num_sketches={rl_cfg.num_sketches} needs sampler.share_sketch=True: sketch-level "
                     "advantages assume each group is num_sketches sketches x group_size / num_sketches "
                     "paints that share them")
  if not sampler.get("sketch_steps"):
    # The sampler's sketch phase is the algorithm's: structure tokens are those it commits.
    sampler["sketch_steps"] = rl_cfg.sketch_steps
  elif sampler["sketch_steps"] != rl_cfg.sketch_steps:
    raise ValueError(
        f"sampler.sketch_steps={sampler['sketch_steps']} disagrees with rl.sketch_fraction="
        f"{rl_cfg.sketch_fraction} (the partition's sketch window, ceil({rl_cfg.sketch_fraction} * "
        f"sampler.num_steps={rl_cfg.num_sampler_steps}) = {rl_cfg.sketch_steps} steps): structure "
        f"candidates and sketch-level advantages would not be the tokens the sampler sketches; set "
        f"sampler.sketch_steps=0 (derived) or {rl_cfg.sketch_steps}, or change rl.sketch_fraction")
  try:
    s_cfg = SamplerConfig.from_mapping(sampler)
  except ValueError as e:
    raise ValueError(f"sampler: {e}") from None
  if share and s_cfg.sketch_steps >= s_cfg.num_steps:
    raise ValueError("sampler.share_sketch needs sampler.sketch_steps < sampler.num_steps")
  batch = config.prompts_per_step * rl_cfg.group_size
  try:
    rl_cfg.validate_batch(batch)
  except ValueError as e:
    raise ValueError(f"rl.micro_batch_size / prompts_per_step: {e}") from None
  # 'unguided_rollouts': rollouts from the policy the estimator scores; CFG stays for evaluation.
  roll_cfg = (dataclasses.replace(s_cfg, cfg_scale=0.0)
              if rl_cfg.estimator_guidance == "unguided_rollouts" else s_cfg)
  return Plan(rl=rl_cfg, sampler=s_cfg, prompts_per_step=config.prompts_per_step,
              batch_size=batch, eval_batch_size=config.eval.batch_size, share_sketch=bool(share),
              rollout_sampler=roll_cfg)


def config_get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def check_mesh(p: Plan, mesh: jax.sharding.Mesh) -> None:
  div = parallel.batch_size_divisor(mesh)
  if p.batch_size % div:
    raise ValueError(f"prompts_per_step * rl.group_size = {p.batch_size} is not a multiple of the "
                     f"mesh's data*fsdp = {div} (mesh={dict(mesh.shape)})")
  if p.share_sketch and p.sketch_rows % div:
    # M sketches per prompt: the sketch batch is prompts_per_step * M rows, sharded like any batch.
    raise ValueError(f"prompts_per_step * rl.num_sketches = {p.sketch_rows} sketch rows is not a multiple "
                     f"of the mesh's data*fsdp = {div}, which sampler.share_sketch=True needs")
  mb = p.rl.micro_batch_size
  if mb and mb % div:
    raise ValueError(f"rl.micro_batch_size={mb} is not a multiple of the mesh's data*fsdp = {div} "
                     f"(each micro-batch is split over the batch axes)")
  if p.eval_batch_size % div:
    raise ValueError(f"eval.batch_size={p.eval_batch_size} is not a multiple of the mesh's "
                     f"data*fsdp = {div}")


OPTIM_KEYS = ("learning_rate", "warmup_steps", "max_grad_norm", "weight_decay", "b1", "b2", "eps")


def validate_optim(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Checks every ``optim.*`` key (unknown ones too); returns them (``eps`` defaults to 1e-8).

  Raises:
    ValueError: naming the key, its value and the constraint it breaks.
  """
  o = dict(config.optim)
  unknown = sorted(set(o) - set(OPTIM_KEYS))
  if unknown:
    raise ValueError(f"optim.{unknown[0]}: not an optimizer setting (known: {', '.join(OPTIM_KEYS)})")
  o.setdefault("eps", 1e-8)
  for key in OPTIM_KEYS[:-1]:
    if key not in o:
      raise ValueError(f"optim.{key}: missing (every config needs {', '.join(OPTIM_KEYS[:-1])})")

  def need(ok: bool, key: str, msg: str):
    if not ok:
      raise ValueError(f"optim.{key}={o[key]!r}: {msg}")

  def number(key: str, none_ok: bool = False) -> bool:
    v = o[key]
    return (none_ok and v is None) or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                       and np.isfinite(v))

  need(number("learning_rate") and o["learning_rate"] > 0, "learning_rate", "must be a finite number > 0")
  w = o["warmup_steps"]
  need(isinstance(w, int) and not isinstance(w, bool) and w >= 0, "warmup_steps",
       "must be an int >= 0 (RL steps)")
  # A negative clip norm scales the gradient by a negative factor: silent gradient ascent.
  need(number("max_grad_norm", none_ok=True) and (o["max_grad_norm"] or 0) >= 0, "max_grad_norm",
       "must be a finite number >= 0 (0 or None: no clipping)")
  need(number("weight_decay") and o["weight_decay"] >= 0, "weight_decay", "must be a finite number >= 0")
  for key in ("b1", "b2"):
    need(number(key) and 0 <= o[key] < 1, key, "must be a number in [0, 1)")
  need(number("eps") and o["eps"] > 0, "eps", "must be a finite number > 0")
  return o


def validate_run_keys(config: ml_collections.ConfigDict) -> None:
  """The run-control keys (optional in a config): ``save_every_minutes`` (number >= 0, 0 = off),
  ``max_consecutive_skips`` (int >= 0, 0 = never stop) and ``allow_config_change`` (bool)."""
  m = config.get("save_every_minutes", 0)
  if isinstance(m, bool) or not isinstance(m, (int, float)) or not np.isfinite(m) or m < 0:
    raise ValueError(f"save_every_minutes={m!r}: must be a finite number >= 0 (0: off)")
  k = config.get("max_consecutive_skips", 0)
  if isinstance(k, bool) or not isinstance(k, int) or k < 0:
    raise ValueError(f"max_consecutive_skips={k!r}: must be an int >= 0 (0: never stop)")
  a = config.get("allow_config_change", False)
  if not isinstance(a, bool):
    raise ValueError(f"allow_config_change={a!r}: must be True or False")


def make_optimizer(config: ml_collections.ConfigDict, p: Plan) -> optax.GradientTransformation:
  """AdamW on a linear-warmup-then-constant schedule counted in inner updates (K per RL step)."""
  o = validate_optim(config)
  warm = o["warmup_steps"] * p.rl.num_iterations
  lr = optax.linear_schedule(0.0, o["learning_rate"], warm) if warm else o["learning_rate"]
  return rl.make_optimizer(lr, clip_norm=o["max_grad_norm"] or None, weight_decay=o["weight_decay"],
                           b1=o["b1"], b2=o["b2"], eps=o["eps"])


def state_shardings(abstract_state: rl.TrainState, param_shardings: Any, optimizer,
                    mesh: jax.sharding.Mesh) -> rl.TrainState:
  """Shardings of a ``TrainState``: optimizer moments follow their params, counters replicated."""
  rep = parallel.replicated(mesh)
  opt = optax.tree_map_params(optimizer, lambda _, s: s, abstract_state.opt_state, param_shardings,
                              transform_non_params=lambda _: rep)
  return rl.TrainState(step=rep, params=param_shardings, opt_state=opt,
                       ref_params=None if abstract_state.ref_params is None else param_shardings,
                       skipped=rep)


def new_state(optimizer: optax.GradientTransformation, p: Plan) -> Callable[[Any], rl.TrainState]:
  """``params -> TrainState`` (with a frozen reference copy when the KL term is on)."""
  return functools.partial(rl.TrainState.create, optimizer=optimizer, with_reference=p.rl.beta > 0)


def abstract_train_state(task: tasks.Task, p: Plan, optimizer, mesh: jax.sharding.Mesh
                         ) -> tuple[rl.TrainState, rl.TrainState, Any]:
  """(abstract state with target shardings, its shardings, abstract params); nothing allocated."""
  pshard = policy.param_shardings(task.model_cfg, task.layout, mesh)
  abstract_params = policy.abstract_params(task.model_cfg, task.layout, mesh)
  abstract = jax.eval_shape(new_state(optimizer, p), abstract_params)
  shardings = state_shardings(abstract, pshard, optimizer, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings, abstract_params


def write_eval(out_dir: str, name: str, res: dict[str, Any], title: str, grid_size: int) -> str:
  """Writes ``eval_{name}.md`` (per-tag table with 95 % intervals), ``grid_{name}.png`` and every
  sample with its verdict under ``evals/{name}/`` (``samples.jsonl`` + PNGs); returns the table."""
  table = evaluate.tag_table(res["tags"], res["strict"], title=title, clusters=res["prompt_index"])
  watch = evaluate.hacking_watch(res)
  if watch:
    table += "\n" + ", ".join(f"{k} {v:.3f}" for k, v in watch.items()) + "\n"
  with open(os.path.join(out_dir, f"eval_{name}.md"), "w") as f:
    f.write(table)
  evaluate.write_samples(os.path.join(out_dir, "evals", name), res)
  n = min(grid_size, len(res["captions"]))
  if n:
    caps = [f"{c}\n{'PASS' if s else 'fail'}" for c, s in zip(res["captions"][:n], res["strict"][:n])]
    evaluate.image_grid(res["images"][:n], caps, os.path.join(out_dir, f"grid_{name}.png"))
  return table


def eval_key(config: ml_collections.ConfigDict) -> jax.Array:
  """The evaluation's PRNG key: from ``eval.seed``, not the run's seed, so every run (arm, seed) is
  judged on the same prompts with the same sampling noise and differences between runs are paired."""
  seed = config.eval.get("seed")
  return jax.random.fold_in(jax.random.PRNGKey(config.seed if seed is None else seed), _EVAL_SALT)


def load_eval_samples(out_dir: str, name: str) -> dict[str, np.ndarray] | None:
  """``tags``, ``prompt_index`` and ``strict`` of an evaluation written by ``write_eval``."""
  path = os.path.join(out_dir, "evals", name, "samples.jsonl")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    recs = [json.loads(line) for line in f if line.strip()]
  return dict(tags=np.asarray([r["tag"] for r in recs]),
              prompt_index=np.asarray([r["prompt_index"] for r in recs]),
              strict=np.asarray([float(r["correct"]) for r in recs]))


def results_table(out_dir: str, first: int, last: int, evals: dict[int, dict[str, float]],
                  title: str) -> str:
  """Base (``first``) vs final (``last``) per-tag table with 95 % cluster-bootstrap intervals and a
  paired interval of the change, when both evaluations sampled the same prompts the same way."""
  name = lambda s: f"step{s:05d}"
  label = lambda s: "base" if s == 0 else f"step {s}"
  cols = {label(s): evals[s] for s in (first, last)}
  a, b = load_eval_samples(out_dir, name(first)), load_eval_samples(out_dir, name(last))
  if a is None or b is None or len(a["strict"]) != len(b["strict"]) or \
     not np.array_equal(a["prompt_index"], b["prompt_index"]):
    return evaluate.comparison_table(cols, title=title)
  draws = evaluate.bootstrap_draws(a["tags"], a["prompt_index"], [a["strict"], b["strict"]])
  intervals = {label(s): {t: evaluate.interval(d[i]) for t, d in draws.items()}
               for i, s in enumerate((first, last))}
  change = {t: evaluate.interval(d[1] - d[0]) for t, d in draws.items()}
  return evaluate.comparison_table(cols, title=title, intervals=intervals, change_intervals=change)


class RunLog:
  """TensorBoard scalars + ``metrics.jsonl`` + the Markdown/PNG reports of a run directory."""

  def __init__(self, workdir: str, start_step: int):
    from tensorboardX import SummaryWriter
    self.workdir = workdir
    self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    self.jsonl = os.path.join(workdir, "metrics.jsonl")
    # A resumed run re-does the steps after its checkpoint: drop their lines so the log reads as
    # one uninterrupted run.
    if os.path.exists(self.jsonl):
      with open(self.jsonl) as f:
        keep = [l for l in f if l.strip() and json.loads(l)["step"] <= start_step]
      with open(self.jsonl, "w") as f:
        f.writelines(keep)

  def scalars(self, step: int, scalars: dict[str, float], extra: dict[str, Any]) -> None:
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    with open(self.jsonl, "a") as f:
      f.write(json.dumps(dict(step=step, **scalars, **extra)) + "\n")

  def close(self):
    self.tb.close()


def _flat_scalars(metrics: dict[str, Any]) -> dict[str, float]:
  out = {}
  for k, v in metrics.items():
    if isinstance(v, dict):
      if k == "iter":
        continue
      out.update({f"{k}/{kk}": float(vv) for kk, vv in v.items() if np.ndim(vv) == 0})
    elif np.ndim(v) == 0:
      out[k] = float(v)
  return out


def jit_decode(task: tasks.Task, mesh: jax.sharding.Mesh) -> Callable[[jax.Array], jax.Array]:
  """``codes int32[B, N] -> uint8[B, H, W, 3]`` on device: decoder params replicated (placed once),
  batch split over ``('data', 'fsdp')``."""
  rep = parallel.replicated(mesh)
  fn = jax.jit(task.decode, in_shardings=(rep, parallel.batch_sharding(mesh, 2)),
               out_shardings=parallel.batch_sharding(mesh, 4))
  return functools.partial(fn, jax.device_put(task.decode_params, rep))


def shared_rewards(reward: Callable[..., Any], captions: list[str], images: np.ndarray,
                   metas: list[str], batch: int) -> np.ndarray:
  """Validated float32[B] rewards, computed once (on process 0) and shared with every host so a
  remote reward server sees one request per batch."""
  name = getattr(reward, "name", getattr(reward, "__name__", "reward"))
  if jax.process_count() == 1:
    return validate_rewards(name, reward(captions, images, meta=metas), batch)
  from jax.experimental import multihost_utils
  scores = (validate_rewards(name, reward(captions, images, meta=metas), batch)
            if jax.process_index() == 0 else np.zeros((batch,), np.float32))
  return np.asarray(multihost_utils.broadcast_one_to_all(scores), np.float32)


def sample_groups(sampler, params: Any, prompts_np: np.ndarray, uncond: jax.Array, p: Plan,
                  key: jax.Array, mesh: jax.sharding.Mesh, *, prompts_b: jax.Array | None = None):
  """One step's P x G rollout images, rows prompt-major (each prompt's G images contiguous).

  ``p.share_sketch``: P x M sketches (each prompt repeated M = rl.num_sketches times, contiguously),
  each branched into G / M paints, so rows run (prompt, sketch, paint) as the hierarchical
  advantages expect. Otherwise G independent samples per prompt.

  Args:
    sampler: a ``sampling.Sampler``.
    params: policy params.
    prompts_np: int32[P, Lp] host prompt tokens.
    uncond: unconditional prompt rows on the mesh: int32[P * M, Lp] with share_sketch, else
      int32[P * G, Lp].
    p: the plan; key: the step's rollout key; mesh: the mesh.
    prompts_b: optional int32[P * G, Lp] on the mesh (the prompts repeated G times), to reuse.

  Returns:
    The ``SampleRecord`` of the P * G images.
  """
  g = p.rl.group_size
  if p.share_sketch:
    m = p.rl.num_sketches
    k_sketch, k_paint = jax.random.split(key)
    sketch = sampler.sketch(params, parallel.global_batch(np.repeat(prompts_np, m, axis=0), mesh),
                            uncond, k_sketch)
    return sampler.paint(params, sampler.branch(sketch, g // m), k_paint)
  if prompts_b is None:
    prompts_b = parallel.global_batch(np.repeat(prompts_np, g, axis=0), mesh)
  return sampler.sample(params, prompts_b, uncond, key)


def train(config: ml_collections.ConfigDict, *, log: Callable[[str], None] = print,
          stop_after: int | None = None) -> dict[str, Any]:
  """Runs (or resumes) a training run described by ``config``.

  Args:
    config: a ``configs/*.py`` config.
    log: where human-readable progress lines go.
    stop_after: end after this many RL steps in this call (the run stays resumable); for tests.

  Returns:
    dict with ``state`` and ``params`` (final), ``step``, ``history`` (train reward per step), ``evals``
    ({step: per-tag scores}), ``workdir`` and ``interrupted`` (None, or 'SIGTERM' / 'SIGINT' /
    'preemption' when a signal stopped the run after saving its last step).

  Raises:
    ValueError: a bad config value (named) before anything is built.
    workdir.WorkdirLockedError: another live run holds the workdir (naming its host and pid).
    workdir.ConfigChangedError: resuming with settings that change the run (naming them).
    NonFiniteUpdateError: ``max_consecutive_skips`` inner updates in a row were non-finite.
    checkpoint.CorruptCheckpointError: no kept checkpoint is intact.
  Whatever ends the run, a pending asynchronous save is finished first.
  """
  p = plan(config)
  parallel.maybe_initialize_distributed()
  mesh = parallel.make_mesh(**dict(config.mesh))
  check_mesh(p, mesh)
  workdir = os.path.abspath(config.workdir)
  control = RunControl(config, workdir, log)  # lock, config check + history, signal handlers
  try:
    out = _train(config, p, mesh, workdir, control, log=log, stop_after=stop_after)
  except BaseException:
    control.close(failing=True)  # finishes the pending save, then lets the error through
    raise
  control.close()
  return out


def _train(config: ml_collections.ConfigDict, p: Plan, mesh: jax.sharding.Mesh, workdir: str,
           control: "RunControl", *, log: Callable[[str], None], stop_after: int | None
           ) -> dict[str, Any]:
  """``train``'s body, run with the workdir locked and the config accepted; ``control`` holds
  what must be closed on every exit path."""
  from tqdm import tqdm

  task = tasks.build_task(config, log=log)
  layout, g = task.layout, p.rl.group_size
  optimizer = make_optimizer(config, p)
  logits_fn = policy.make_canvas_logits_fn(task.model_cfg, layout)
  abstract_state, shardings, abstract_params = abstract_train_state(task, p, optimizer, mesh)

  ckpt = control.ckpt = RunCheckpointer(os.path.join(workdir, "checkpoints"),
                                        keep=config.keep_checkpoints)
  data = iter(task.train_dataset(p.prompts_per_step, config.seed))
  if ckpt.latest_step() is not None:
    # The newest intact step: corrupt newer ones are named in a warning and moved aside.
    state, data_state, loop = ckpt.restore(abstract_state, warn=lambda m: log(f"WARNING: {m}"))
    data.set_state(data_state)
    log(f"Resumed {workdir} at step {loop['step']}.")
  else:
    params = task.load_base_params(abstract_params)
    state = jax.jit(new_state(optimizer, p), out_shardings=shardings)(params)
    del params
    loop = dict(step=0, seed=config.seed, history=[], evals={})
  start = int(loop["step"])

  sampler = make_sampler(logits_fn, p.sampler, num_tokens=layout.num_image_tokens, mesh=mesh,
                         params_sharding=shardings.params)
  # Training rollouts may drop CFG ('unguided_rollouts'); evaluation keeps the config's sampler.
  roll_sampler = sampler if p.rollout_sampler == p.sampler else make_sampler(
      logits_fn, p.rollout_sampler, num_tokens=layout.num_image_tokens, mesh=mesh,
      params_sharding=shardings.params)
  # 'guided': the ratios score the guided, tempered distribution the rollouts were drawn from.
  score_fn = (guided_canvas_logits_fn(logits_fn, p.rollout_sampler, layout.unconditional_prompts(1)[0])
              if p.rl.estimator_guidance == "guided" else logits_fn)
  step_fn = rl.make_train_step(score_fn, optimizer, p.rl, mesh=mesh, state_shardings=shardings)
  decode = jit_decode(task, mesh)
  root = jax.random.PRNGKey(config.seed)
  ekey = eval_key(config)
  uncond_p = (parallel.global_batch(layout.unconditional_prompts(p.sketch_rows), mesh)
              if p.share_sketch else None)
  uncond_b = parallel.global_batch(layout.unconditional_prompts(p.batch_size), mesh)
  runlog = control.runlog = RunLog(workdir, start)
  control.last_saved = start

  def run_eval(step: int, params) -> dict[str, float]:
    # The base and the final policy (results.md's two columns) get more samples per prompt.
    final = step == 0 or step == config.total_steps
    n = config.eval.get("final_samples_per_prompt", 1) if final else \
        config.eval.get("samples_per_prompt", 1)
    res = evaluate.evaluate_policy(sampler, params, layout, decode, task.eval_prompts, ekey,
                                   score=task.score, samples_per_prompt=n,
                                   batch_size=p.eval_batch_size, judge=task.judge)
    label = "base" if step == 0 else f"step {step}"
    write_eval(workdir, f"step{step:05d}", res, f"{task.name} held-out, {label}",
               config.eval.grid_size)
    for k, v in {**res["scores"], **evaluate.hacking_watch(res)}.items():
      runlog.tb.add_scalar(f"eval/{k}", v, step)
    return res["scores"]  # the hacking watch lives in the eval table and TensorBoard

  def report():
    evals = {int(k): v for k, v in loop["evals"].items()}
    evaluate.plot_curves(os.path.join(workdir, "reward_curve.png"),
                         [(h["step"], h["reward"]) for h in loop["history"]],
                         [(s, e["overall"]) for s, e in sorted(evals.items())],
                         title=f"{config.rl.preset} on {task.name}")
    if evals:
      steps = sorted(evals)
      table = results_table(workdir, steps[0], steps[-1], evals,
                            title=f"{task.name} held-out ({config.rl.preset})")
      with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table)
      return table
    return ""

  if "0" not in loop["evals"] and config.eval.at_start:
    log("Evaluating the base policy on the held-out prompts...")
    loop["evals"]["0"] = run_eval(0, state.params)
    log(f"base policy: overall {loop['evals']['0']['overall']:.3f}")
  if start and str(start) not in loop["evals"] and (
      start % config.eval_every == 0 or start == config.total_steps):
    # A step is saved before it is evaluated, so a run stopped during that evaluation resumes
    # without it: redo it (fixed eval key: the same scores an uninterrupted run got).
    loop["evals"][str(start)] = run_eval(start, state.params)
    report()

  end = config.total_steps if stop_after is None else min(config.total_steps, start + stop_after)
  bar = tqdm(total=config.total_steps, initial=start, desc=f"{config.rl.preset} RL",
             dynamic_ncols=True, disable=not config.get("progress", True))
  t_last = time.time()
  control.in_loop = True
  for step in range(start, end):
    if control.should_stop(step):
      # SIGTERM / SIGINT / a preemption notice: keep the last completed step, then stop.
      if control.last_saved != step:
        ckpt.save(step, state, data.get_state(), loop)
        control.saved(step)
      bar.write(f"{control.stop_signal}: saved step {step}; stopping (rerun the same command to "
                "resume)")
      break
    batch = next(data)
    k_roll, k_step = jax.random.split(jax.random.fold_in(root, step))
    prompts_np = np.asarray(batch["prompt_tokens"], np.int32)
    prompts_b = parallel.global_batch(np.repeat(prompts_np, g, axis=0), mesh)
    record = sample_groups(roll_sampler, state.params, prompts_np,
                           uncond_p if p.share_sketch else uncond_b, p, k_roll, mesh,
                           prompts_b=prompts_b)
    images = parallel.to_host(decode(record.image_tokens))
    captions = [str(c) for c in np.repeat(batch["caption"], g)]
    metas = [str(m) for m in np.repeat(batch["meta"], g)]
    rewards = shared_rewards(task.reward, captions, images, metas, p.batch_size)
    rollout = record.to_rollout(prompts_b, parallel.global_batch(rewards, mesh))
    state, metrics = step_fn(state, rollout, k_step)
    done = step + 1
    loop["consecutive_skips"] = check_skips(config, done, metrics, loop.get("consecutive_skips", 0))
    reward = float(rewards.mean())
    loop["history"].append(dict(step=done, reward=reward))
    if done % config.log_every == 0 or done == end:
      scalars = _flat_scalars(jax.device_get(metrics))
      now = time.time()
      scalars["time/step_s"] = (now - t_last) / (done % config.log_every or config.log_every)
      t_last = now
      runlog.scalars(done, scalars, dict(prompts=[str(c) for c in batch["caption"]]))
      bar.set_postfix(reward=f"{reward:.3f}", loss=f"{scalars['total/loss']:.4f}",
                      kl=f"{scalars['total/kl']:.4f}")
    bar.update(1)
    loop["step"] = done
    # Save first: an evaluation that fails must not cost the step.
    if done % config.save_every == 0 or done == end or control.save_due():
      ckpt.save(done, state, data.get_state(), loop)
      control.saved(done)
    if done % config.eval_every == 0 or done == config.total_steps:
      loop["evals"][str(done)] = run_eval(done, state.params)
      bar.write(f"step {done}: held-out overall {loop['evals'][str(done)]['overall']:.3f}")
      report()
  control.in_loop = False
  bar.close()
  ckpt.close()
  runlog.close()
  table = report()
  if table and loop["step"] == config.total_steps:
    log(table)
  return dict(state=state, params=state.params, step=loop["step"], history=loop["history"],
              evals={int(k): v for k, v in loop["evals"].items()}, workdir=workdir,
              interrupted=control.stop_signal)


class NonFiniteUpdateError(RuntimeError):
  """``max_consecutive_skips`` inner updates in a row were skipped as non-finite."""


def check_skips(config: ml_collections.ConfigDict, done: int, metrics: dict[str, Any],
                consecutive: int) -> int:
  """Updates the count of consecutive skipped inner updates with step ``done``'s K flags.

  The compiled step never writes a non-finite update (it keeps the old params), but a run whose
  every update is skipped is not training: past ``max_consecutive_skips`` it stops, by name.

  Returns:
    the new count (checkpointed with the loop state).

  Raises:
    NonFiniteUpdateError: the count reached ``max_consecutive_skips`` (> 0).
  """
  flags = np.asarray(jax.device_get(metrics["iter"]["skipped"])).reshape(-1)
  for f in flags:
    consecutive = consecutive + 1 if f else 0
  limit = config.get("max_consecutive_skips", 0)
  if limit and consecutive >= limit:
    it = jax.device_get(metrics["iter"])
    raise NonFiniteUpdateError(
        f"{consecutive} consecutive inner updates were skipped (non-finite loss, gradient, params or "
        f"optimizer state) up to step {done}, max_consecutive_skips={limit}: the run is not "
        f"training. Last step: loss per iteration {np.asarray(it['loss']).tolist()}, grad_norm "
        f"{np.asarray(it['grad_norm']).tolist()}. Check optim.learning_rate / optim.max_grad_norm "
        "(clipping) / optim.weight_decay and the rewards; the last checkpoint holds finite params "
        "(resuming with changed optim.* needs --config.allow_config_change=True).")
  return consecutive


class TrainingInterrupted(KeyboardInterrupt):
  """A second SIGTERM/SIGINT (or one outside the training loop): stop now."""


class RunControl:
  """What surrounds the training loop, closed on every exit path.

  * the workdir lock (``workdir.WorkdirLock``) and the config comparison / history
    (``workdir.check_config``), both decided by process 0;
  * SIGTERM (TPU maintenance, spot preemption) and SIGINT: the first one lets the current step
    finish, saves it and stops the loop (``stop_signal``); a second one, or one before the loop,
    raises ``TrainingInterrupted`` at once. Installed only in a single-process run's main thread:
    in a multi-host run JAX's preemption service owns SIGTERM and ``reached_preemption`` (checked
    at every step) brings all processes to the same save;
  * ``save_every_minutes``: a time-based save, decided by process 0 for every process;
  * ``close``: restores the handlers, finishes the pending asynchronous save, closes the logs and
    releases the lock.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None]):
    self.log = log
    self.ckpt: RunCheckpointer | None = None
    self.runlog: RunLog | None = None
    self.lock: workdir_lib.WorkdirLock | None = None
    self.stop_signal: str | None = None
    self.in_loop = False
    self.last_saved: int | None = None
    self.save_every_s = 60.0 * float(config.get("save_every_minutes", 0) or 0)
    self._last_save_t = time.monotonic()
    self._handlers: dict[int, Any] = {}
    try:
      def claim():
        os.makedirs(workdir, exist_ok=True)
        self.lock = workdir_lib.WorkdirLock(workdir).acquire()
        workdir_lib.check_config(
            workdir, config.to_json_best_effort(),
            resuming=bool(step_dirs(os.path.join(workdir, "checkpoints"))),
            allow=bool(config.get("allow_config_change", False)), log=log)
      _on_primary(claim)
      if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
          self._handlers[sig] = signal.signal(sig, self._on_signal)
    except BaseException:
      self.close(failing=True)
      raise

  def _on_signal(self, signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if not self.in_loop or self.stop_signal is not None:
      raise TrainingInterrupted(f"{name}: stopping now" + (
          " (second signal)" if self.stop_signal else " (nothing new to save yet)"))
    self.stop_signal = name
    self.log(f"{name}: finishing this step, saving it, then stopping (send {name} again to stop "
             "at once)")

  def should_stop(self, step: int) -> bool:
    if self.stop_signal is None and self.ckpt is not None and self.ckpt.reached_preemption(step):
      self.stop_signal = "preemption"
    return self.stop_signal is not None

  def save_due(self) -> bool:
    if not self.save_every_s:
      return False
    due = time.monotonic() - self._last_save_t >= self.save_every_s
    if jax.process_count() > 1:  # clocks differ: every process must make the same call
      from jax.experimental import multihost_utils
      due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
    return due

  def saved(self, step: int) -> None:
    self.last_saved, self._last_save_t = step, time.monotonic()

  def close(self, failing: bool = False) -> None:
    """Idempotent. ``failing``: an exception is propagating, so errors here are logged, not raised
    over it."""
    for sig, handler in self._handlers.items():  # first: a signal during the wait below stops it
      signal.signal(sig, handler)
    self._handlers = {}
    errors = []
    for name in ("ckpt", "runlog"):
      obj = getattr(self, name)
      setattr(self, name, None)
      if obj is not None:
        try:
          obj.close()  # the checkpointer waits for the pending save here
        except Exception as e:  # noqa: BLE001
          errors.append(e)
    if self.lock is not None:
      self.lock.release()
      self.lock = None
    if errors and failing:
      self.log(f"WARNING: while stopping after an error, closing the run failed too: {errors}")
    elif errors:
      raise errors[0]


def _on_primary(fn: Callable[[], None]) -> None:
  """Runs ``fn`` on process 0; every process raises if it failed (so none goes on alone)."""
  err = None
  if jax.process_index() == 0:
    try:
      fn()
    except Exception as e:  # noqa: BLE001
      err = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(err is None)))
    if not ok and err is None:
      raise RuntimeError("process 0 refused to start this run (workdir lock or config check); "
                         "see its log")
  if err is not None:
    raise err


def evaluate_checkpoint(config: ml_collections.ConfigDict, *, which: str = "latest",
                        samples_per_prompt: int = 1, out_dir: str | None = None,
                        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Scores a policy on the task's held-out prompts, GenEval-style.

  Args:
    config: the training config (task, sampler, eval settings).
    which: 'base' (the pretrained / converted base params), 'latest' (the newest run checkpoint
      under ``config.workdir``) or a step number.
    samples_per_prompt: images per prompt (GenEval uses 4).
    out_dir: where the table (``eval_<which>.md``), grid and JSON go; default ``config.workdir``.

  Returns:
    dict with ``scores`` (per tag + overall), ``table`` (Markdown) and ``strict`` float32[P*G].
  """
  p = plan(config)
  mesh = parallel.make_mesh(**dict(config.mesh))
  check_mesh(p, mesh)
  task = tasks.build_task(config, log=log)
  layout = task.layout
  abstract_state, _, abstract_params = abstract_train_state(task, p, make_optimizer(config, p), mesh)
  if which == "base":
    params = task.load_base_params(abstract_params)
  else:
    ckpt = RunCheckpointer(os.path.join(os.path.abspath(config.workdir), "checkpoints"))
    step = None if which == "latest" else int(which)
    if ckpt.latest_step() is None:
      raise ValueError(f"no run checkpoint under {ckpt.directory}; use which='base'")
    state, _, loop = ckpt.restore(abstract_state, step=step)
    ckpt.close()
    params, which = state.params, f"step{loop['step']}"
  logits_fn = policy.make_canvas_logits_fn(task.model_cfg, layout)
  sampler = make_sampler(logits_fn, p.sampler, num_tokens=layout.num_image_tokens, mesh=mesh)
  decode = jit_decode(task, mesh)
  res = evaluate.evaluate_policy(sampler, params, layout, decode, task.eval_prompts,
                                 eval_key(config), score=task.score,
                                 samples_per_prompt=samples_per_prompt,
                                 batch_size=p.eval_batch_size, judge=task.judge)
  out_dir = os.path.abspath(out_dir or config.workdir)
  os.makedirs(out_dir, exist_ok=True)
  table = write_eval(out_dir, which, res, f"{task.name} held-out, {which}", config.eval.grid_size)
  with open(os.path.join(out_dir, f"eval_{which}.json"), "w") as f:
    json.dump(dict(scores=res["scores"], sampler=str(p.sampler),
                   samples_per_prompt=samples_per_prompt), f, indent=2)
  return dict(scores=res["scores"], table=table, strict=res["strict"])
