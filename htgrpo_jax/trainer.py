"""The HT-GRPO trainer: prompts -> G rollouts each -> decode -> rewards -> one compiled update.

``train(config)`` is what ``launch/train.py`` runs. Per RL step:

  1. P prompts from the task's grain dataset (its iterator state is checkpointed);
  2. the jitted sampler draws G images per prompt (``sampler.share_sketch``: one sketch per prompt
     branched into G paints), recording each token's commit step, entropy and log-prob;
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
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax

from htgrpo_jax import evaluate, parallel, rl, tasks
from htgrpo_jax.checkpoint import RunCheckpointer
from htgrpo_jax.models import policy
from htgrpo_jax.rewards.base import validate_rewards
from htgrpo_jax.sampling import SamplerConfig, make_sampler

_EVAL_SALT = 0x5EED_E7A1  # eval keys are fixed per run (the same prompts and noise every eval)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The validated, static parts of a training config."""
  rl: rl.HTGRPOConfig
  sampler: SamplerConfig
  prompts_per_step: int
  batch_size: int
  eval_batch_size: int
  share_sketch: bool = False


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
  need(config.rl.preset in rl.PRESETS, "rl.preset", f"must be one of {tuple(rl.PRESETS)}")
  sampler = dict(config.sampler)
  share = sampler.pop("share_sketch", False)
  overrides = {k: v for k, v in config.rl.items()
               if k not in ("preset", "group_size") and v is not None}
  try:
    rl_cfg = rl.preset(config.rl.preset, group_size=config.rl.group_size,
                       num_sampler_steps=config.sampler.num_steps, **overrides)
  except TypeError as e:
    raise ValueError(f"rl: {e}") from None
  except ValueError as e:  # HTGRPOConfig names the field; say where it lives in the config
    raise ValueError(f"rl: {e}") from None
  if not sampler.get("sketch_steps"):
    # The sampler's sketch phase is the algorithm's: structure tokens are those it commits.
    sampler["sketch_steps"] = rl_cfg.sketch_steps
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
  return Plan(rl=rl_cfg, sampler=s_cfg, prompts_per_step=config.prompts_per_step,
              batch_size=batch, eval_batch_size=config.eval.batch_size, share_sketch=bool(share))


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
  if p.share_sketch and p.prompts_per_step % div:
    # One sketch per prompt: the sketch batch is prompts_per_step rows, sharded like any batch.
    raise ValueError(f"prompts_per_step={p.prompts_per_step} is not a multiple of the mesh's "
                     f"data*fsdp = {div}, which sampler.share_sketch=True needs")
  mb = p.rl.micro_batch_size
  if mb and mb % div:
    raise ValueError(f"rl.micro_batch_size={mb} is not a multiple of the mesh's data*fsdp = {div} "
                     f"(each micro-batch is split over the batch axes)")
  if p.eval_batch_size % div:
    raise ValueError(f"eval.batch_size={p.eval_batch_size} is not a multiple of the mesh's "
                     f"data*fsdp = {div}")


def make_optimizer(config: ml_collections.ConfigDict, p: Plan) -> optax.GradientTransformation:
  """AdamW on a linear-warmup-then-constant schedule counted in inner updates (K per RL step)."""
  o = config.optim
  if not o.learning_rate > 0:
    raise ValueError(f"optim.learning_rate={o.learning_rate!r} must be > 0")
  warm = o.warmup_steps * p.rl.num_iterations
  lr = optax.linear_schedule(0.0, o.learning_rate, warm) if warm else o.learning_rate
  return rl.make_optimizer(lr, clip_norm=o.max_grad_norm or None, weight_decay=o.weight_decay,
                           b1=o.b1, b2=o.b2)


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


def train(config: ml_collections.ConfigDict, *, log: Callable[[str], None] = print,
          stop_after: int | None = None) -> dict[str, Any]:
  """Runs (or resumes) a training run described by ``config``.

  Args:
    config: a ``configs/*.py`` config.
    log: where human-readable progress lines go.
    stop_after: end after this many RL steps in this call (the run stays resumable); for tests.

  Returns:
    dict with ``state`` and ``params`` (final), ``step``, ``history`` (train reward per step), ``evals``
    ({step: per-tag scores}) and ``workdir``.
  """
  from tqdm import tqdm

  p = plan(config)
  parallel.maybe_initialize_distributed()
  mesh = parallel.make_mesh(**dict(config.mesh))
  check_mesh(p, mesh)
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))

  task = tasks.build_task(config, log=log)
  layout, g = task.layout, p.rl.group_size
  optimizer = make_optimizer(config, p)
  logits_fn = policy.make_canvas_logits_fn(task.model_cfg, layout)
  abstract_state, shardings, abstract_params = abstract_train_state(task, p, optimizer, mesh)

  ckpt = RunCheckpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
  data = iter(task.train_dataset(p.prompts_per_step, config.seed))
  if ckpt.latest_step() is not None:
    state, data_state, loop = ckpt.restore(abstract_state)
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
  step_fn = rl.make_train_step(logits_fn, optimizer, p.rl, mesh=mesh, state_shardings=shardings)
  decode = jit_decode(task, mesh)
  root = jax.random.PRNGKey(config.seed)
  ekey = eval_key(config)
  uncond_p = (parallel.global_batch(layout.unconditional_prompts(p.prompts_per_step), mesh)
              if p.share_sketch else None)
  uncond_b = parallel.global_batch(layout.unconditional_prompts(p.batch_size), mesh)
  runlog = RunLog(workdir, start)

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
    return dict(res["scores"], **evaluate.hacking_watch(res))

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

  end = config.total_steps if stop_after is None else min(config.total_steps, start + stop_after)
  bar = tqdm(total=config.total_steps, initial=start, desc=f"{config.rl.preset} RL",
             dynamic_ncols=True, disable=not config.get("progress", True))
  t_last = time.time()
  for step in range(start, end):
    batch = next(data)
    k_roll, k_step = jax.random.split(jax.random.fold_in(root, step))
    prompts_np = np.asarray(batch["prompt_tokens"], np.int32)
    prompts_b = parallel.global_batch(np.repeat(prompts_np, g, axis=0), mesh)
    if p.share_sketch:
      k_sketch, k_paint = jax.random.split(k_roll)
      sketch = sampler.sketch(state.params, parallel.global_batch(prompts_np, mesh), uncond_p,
                              k_sketch)
      record = sampler.paint(state.params, sampler.branch(sketch, g), k_paint)
    else:
      record = sampler.sample(state.params, prompts_b, uncond_b, k_roll)
    images = parallel.to_host(decode(record.image_tokens))
    captions = [str(c) for c in np.repeat(batch["caption"], g)]
    metas = [str(m) for m in np.repeat(batch["meta"], g)]
    rewards = shared_rewards(task.reward, captions, images, metas, p.batch_size)
    rollout = record.to_rollout(prompts_b, parallel.global_batch(rewards, mesh))
    state, metrics = step_fn(state, rollout, k_step)
    done = step + 1
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
    if done % config.eval_every == 0 or done == config.total_steps:
      loop["evals"][str(done)] = run_eval(done, state.params)
      bar.write(f"step {done}: held-out overall {loop['evals'][str(done)]['overall']:.3f}")
      report()
    if done % config.save_every == 0 or done == end:
      ckpt.save(done, state, data.get_state(), loop)
  bar.close()
  ckpt.close()
  runlog.close()
  table = report()
  if table and loop["step"] == config.total_steps:
    log(table)
  return dict(state=state, params=state.params, step=loop["step"], history=loop["history"],
              evals={int(k): v for k, v in loop["evals"].items()}, workdir=workdir)


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
