"""The HT-GRPO trainer: prompts -> G rollouts each -> decode -> rewards -> one compiled update.

``train(config)`` is what ``launch/train.py`` runs; every process of a multi-host job runs it.
The run is planned first (``run_config.plan``: the config validated, nothing built), then, per RL
step:

  1. P prompts from the task's grain dataset (its iterator state is checkpointed);
  2. ``rollouts.collect_rollouts``: the jitted sampler draws G images per prompt (with
     ``sampler.share_sketch``, M = rl.num_sketches sketches per prompt, each branched into G / M
     paints), the task's VQ decoder turns codes into pixels on device, the reward is computed
     once on the host and shared, and the ``Rollout`` is built;
  3. ``rl.make_train_step``'s single compiled function runs the K sketch-then-paint updates;
  4. ``writer``: metrics go to a progress bar, TensorBoard and ``metrics.jsonl``; every
     ``eval_every`` steps the held-out prompts are scored (Markdown table, PNG grid, reward
     curve); only process 0 writes or prints;
  5. every ``save_every`` steps an async Orbax checkpoint holds the train state, the data iterator
     and the loop state (``LoopState``), and a restarted run resumes from it.

All randomness of step ``s`` comes from ``fold_in(PRNGKey(seed), s)``, so a resumed run draws
exactly what an uninterrupted one would. ``profile_steps`` ("start,stop") traces RL steps
[start, stop) into ``<workdir>/profile`` (TensorBoard's profile plugin / Perfetto).

``config.workdir`` may be a URL (``gs://bucket/run``): it is kept as it is (``paths.resolve``),
every file of the run goes through ``htgrpo_jax.paths`` (the checkpoints through Orbax, the trace
through ``jax.profiler``, both of which write URLs themselves), and the workdir lock is skipped
with a note in the log (an object store cannot lock; ``workdir.WorkdirLock``).

Config validation lives in ``run_config``, the rollout stage in ``rollouts``, host-side output in
``writer``, the lock / signals / profile trace around the loop in ``run_control`` and checkpoint
evaluation in ``evaluate_run``; their public names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
import numpy as np

from htgrpo_jax import evaluate, parallel, paths, rl, rollouts, tasks, writer
from htgrpo_jax.checkpoint import RunCheckpointer
from htgrpo_jax.models import policy
from htgrpo_jax.sampling import guided_canvas_logits_fn, make_sampler

# Re-exported: callers (launch/, bench/, aot.py, study.py, tests) keep using ``trainer.<name>``.
from htgrpo_jax.evaluate_run import evaluate_checkpoint, restore_params  # noqa: F401
from htgrpo_jax.rollouts import (collect_rollouts, jit_decode, sample_groups, shared_rewards)  # noqa: F401
from htgrpo_jax.run_config import (
    OPTIM_KEYS,  # noqa: F401
    Plan,
    abstract_train_state,
    check_mesh,  # noqa: F401
    config_get,  # noqa: F401
    eval_key,
    make_optimizer,
    new_state,
    plan,
    profile_window,
    state_shardings,  # noqa: F401
    validate_optim,  # noqa: F401
    validate_run_keys,  # noqa: F401
)
from htgrpo_jax.run_control import Profiler, RunControl, TrainingInterrupted, exit_status  # noqa: F401
from htgrpo_jax.writer import (RunLog, load_eval_samples, results_table, write_eval)  # noqa: F401


def itstime(step: int, every: int, total: int, *, first: bool = False, last: bool = True) -> bool:
  """Whether completed step ``step`` (1-based) is one to log / save / evaluate at (big_vision's
  ``itstime``): every ``every`` steps, at ``total`` (``last``) and at step 1 (``first``)."""
  return (last and step == total) or (first and step == 1) or (every > 0 and step % every == 0)


@dataclasses.dataclass
class LoopState:
  """What the loop carries from step to step besides the train state and the data iterator;
  checkpointed with them as JSON (``to_json`` / ``from_json``).

  Attributes:
    step: completed RL steps.
    seed: the run's seed (a record: the config's seed drives the run).
    history: ``{'step', 'reward'}`` per completed step (the batch's mean train reward).
    evals: ``{step: per-tag held-out scores}`` of every evaluation so far (0: the base policy).
    consecutive_skips: inner updates skipped as non-finite in a row, up to ``step``.
  """

  step: int = 0
  seed: int = 0
  history: list[dict[str, float]] = dataclasses.field(default_factory=list)
  evals: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
  consecutive_skips: int = 0

  def to_json(self) -> dict[str, Any]:
    return dict(
        step=self.step,
        seed=self.seed,
        history=self.history,
        evals={str(k): v for k, v in self.evals.items()},
        consecutive_skips=self.consecutive_skips,
    )

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "LoopState":
    return cls(
        step=int(d["step"]),
        seed=d.get("seed", 0),
        history=list(d["history"]),
        evals={int(k): v for k, v in d["evals"].items()},
        consecutive_skips=int(d.get("consecutive_skips", 0)),
    )


class Programs(NamedTuple):
  """The compiled pieces of a run (built once, reused every step)."""

  sampler: Any  # the config's sampler: evaluations
  rollout_sampler: Any  # training rollouts (the same, or without CFG: 'unguided_rollouts')
  train_step: Callable  # (state, rollout, key, supervised or None) -> (state, metrics)
  decode: Callable  # codes int32[B, N] -> uint8[B, H, W, 3], on device
  uncond: jax.Array  # the rollouts' unconditional prompt rows (rollouts.unconditional_rows)


def build_programs(task: tasks.Task, p: Plan, optimizer, shardings: rl.TrainState, mesh: jax.sharding.Mesh) -> Programs:
  """The samplers, the train step and the decoder of a run on ``mesh``."""
  layout = task.layout
  logits_fn = policy.make_canvas_logits_fn(task.model_cfg, layout)
  # The samplers take the policy's params: the params, or (LoRA) the frozen base + the adapters.
  # The evaluation sampler may use the rollout cache (eval.sampler_cache); the rollout sampler never does.
  sampler = make_sampler(
      logits_fn,
      p.sampler,
      num_tokens=layout.num_image_tokens,
      mesh=mesh,
      params_sharding=shardings.policy_params(),
      cached_logits=policy.make_cached_logits(task.model_cfg, layout),
  )
  # Training rollouts may drop CFG ('unguided_rollouts'); evaluation keeps the config's sampler.
  roll_sampler = (
      sampler
      if p.rollout_sampler == p.sampler
      else make_sampler(
          logits_fn,
          p.rollout_sampler,
          num_tokens=layout.num_image_tokens,
          mesh=mesh,
          params_sharding=shardings.policy_params(),
      )
  )
  # 'guided': the ratios score the guided, tempered distribution the rollouts were drawn from.
  score_fn = (
      guided_canvas_logits_fn(logits_fn, p.rollout_sampler, layout.unconditional_prompts(1)[0])
      if p.rl.estimator_guidance == "guided"
      else logits_fn
  )
  step_fn = rl.make_train_step(
      score_fn, optimizer, p.rl, mesh=mesh, state_shardings=shardings, supervised_logits_fn=logits_fn
  )
  return Programs(
      sampler=sampler,
      rollout_sampler=roll_sampler,
      train_step=step_fn,
      decode=jit_decode(task, mesh),
      uncond=rollouts.unconditional_rows(layout, p, mesh),
  )


def train(
    config: ml_collections.ConfigDict, *, log: Callable[[str], None] = print, stop_after: int | None = None
) -> dict[str, Any]:
  """Runs (or resumes) a training run described by ``config``.

  Args:
    config: a ``configs/*.py`` config.
    log: where human-readable progress lines go (process 0's only; the others print nothing).
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
  # Hosts started with different commands or files would compile different programs and hang.
  parallel.check_same_everywhere("the config", config.to_json_best_effort())
  log = writer.primary_log(log)
  mesh = parallel.make_mesh(**dict(config.mesh))
  check_mesh(p, mesh)
  workdir = paths.resolve(config.workdir)  # a URL stays a URL (abspath would make it <cwd>/gs:/...)
  control = RunControl(config, workdir, log)  # lock, config check + history, signal handlers
  try:
    out = _train(config, p, mesh, workdir, control, log=log, stop_after=stop_after)
  except BaseException:
    control.close(failing=True)  # finishes the pending save, then lets the error through
    raise
  control.close()
  return out


def _train(
    config: ml_collections.ConfigDict,
    p: Plan,
    mesh: jax.sharding.Mesh,
    workdir: str,
    control: "RunControl",
    *,
    log: Callable[[str], None],
    stop_after: int | None,
) -> dict[str, Any]:
  """``train``'s body, run with the workdir locked and the config accepted; ``control`` holds
  what must be closed on every exit path."""
  task = tasks.build_task(config, log=log)
  optimizer = make_optimizer(config, p)
  abstract_state, shardings, abstract_params = abstract_train_state(task, p, optimizer, mesh)

  # The state: the newest intact checkpoint (corrupt newer ones are named and moved aside), or
  # the base policy.
  ckpt = control.ckpt = RunCheckpointer(paths.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
  data = iter(task.train_dataset(p.prompts_per_step, config.seed))
  if p.rl.ptx_coef > 0:
    check_supervised(task, p)
  # A frozen base (LoRA) is never in a run checkpoint: it is read from the base checkpoint.
  if ckpt.latest_step() is not None:
    state, data_state, loop_json = ckpt.restore(abstract_state.without_frozen(), warn=lambda m: log(f"WARNING: {m}"))
    if abstract_state.frozen is not None:
      state = state.replace(frozen=task.load_base_params(abstract_params))
    data.set_state(data_state)
    loop = LoopState.from_json(loop_json)
    log(f"Resumed {workdir} at step {loop.step}.")
  else:
    params = task.load_base_params(abstract_params)
    state = initial_state(task, p, optimizer, shardings, params, mesh, config.seed)
    del params
    loop = LoopState(seed=config.seed)
  start = loop.step

  programs = build_programs(task, p, optimizer, shardings, mesh)
  root = jax.random.PRNGKey(config.seed)
  runlog = control.runlog = writer.RunLog(workdir, start, log=log)
  control.profiler = Profiler(profile_window(config), paths.join(workdir, "profile"))
  control.last_saved = start
  evaluator = _Evaluator(config, task, p, programs, runlog, workdir)

  def save(step: int) -> None:
    ckpt.save(step, state.without_frozen(), data.get_state(), loop.to_json())
    control.saved(step)
    runlog.flush()  # a URL workdir's metrics.jsonl then covers every step a checkpoint holds

  def evaluate_and_report(step: int) -> None:
    loop.evals[step] = evaluator(step, state.policy_params())
    evaluator.report(loop)
    runlog.flush()

  if 0 not in loop.evals and config.eval.at_start:
    log("Evaluating the base policy on the held-out prompts...")
    loop.evals[0] = evaluator(0, state.policy_params())
    runlog.flush()
    log(f"base policy: overall {loop.evals[0]['overall']:.3f}")
  if start and start not in loop.evals and itstime(start, config.eval_every, config.total_steps):
    # A step is saved before it is evaluated, so a run stopped during that evaluation resumes
    # without it: redo it (fixed eval key: the same scores an uninterrupted run got).
    evaluate_and_report(start)

  end = config.total_steps if stop_after is None else min(config.total_steps, start + stop_after)
  bar = writer.Progress(
      total=config.total_steps, initial=start, desc=f"{config.rl.preset} RL", enabled=config.get("progress", True)
  )
  t_last, last_logged = time.time(), start
  control.in_loop = True
  for step in range(start, end):
    if control.should_stop(step):
      # SIGTERM / SIGINT / a preemption notice: keep the last completed step, then stop.
      if control.last_saved != step:
        save(step)
      bar.write(f"{control.stop_signal}: saved step {step}; stopping (rerun the same command to " "resume)")
      break
    control.profiler.at(step)
    batch = next(data)
    k_roll, k_step = jax.random.split(jax.random.fold_in(root, step))
    rollout, info = collect_rollouts(
        programs.rollout_sampler,
        state.policy_params(),
        batch,
        k_roll,
        p=p,
        uncond=programs.uncond,
        decode=programs.decode,
        reward=task.reward,
        mesh=mesh,
    )
    supervised = supervised_batch(batch, mesh) if p.rl.ptx_coef > 0 else None
    state, metrics = programs.train_step(state, rollout, k_step, supervised)
    done = step + 1
    loop.consecutive_skips = check_skips(config, done, metrics, loop.consecutive_skips)
    loop.history.append(dict(step=done, reward=info.reward_mean))
    loop.step = done
    if itstime(done, config.log_every, end):
      scalars = writer.flat_scalars(jax.device_get(metrics))
      now = time.time()
      scalars["time/step_s"] = (now - t_last) / (done - last_logged)  # since the last log line
      scalars.update({f"reward/{n}": float(v.mean()) for n, v in info.components.items()})
      t_last, last_logged = now, done
      runlog.scalars(done, scalars, dict(prompts=info.captions))
      bar.set_postfix(
          reward=f"{info.reward_mean:.3f}", loss=f"{scalars['total/loss']:.4f}", kl=f"{scalars['total/kl']:.4f}"
      )
    bar.update(1)
    # Save first: an evaluation that fails must not cost the step.
    if itstime(done, config.save_every, end) or control.save_due():
      save(done)
    if itstime(done, config.eval_every, config.total_steps):
      evaluate_and_report(done)
      bar.write(f"step {done}: held-out overall {loop.evals[done]['overall']:.3f}")
  control.in_loop = False
  bar.close()
  errors = control.close_run()  # the profile trace, the pending save, the logs
  if errors:
    raise errors[0]
  table = evaluator.report(loop)
  if table and loop.step == config.total_steps:
    log(table)
  return dict(
      state=state,
      params=state.policy_params(),
      step=loop.step,
      history=loop.history,
      evals=dict(loop.evals),
      workdir=workdir,
      interrupted=control.stop_signal,
  )


def check_supervised(task: tasks.Task, p: Plan) -> None:
  """``rl.ptx_coef > 0`` trains on the training batches' ground-truth image tokens: a task whose
  batches carry none is refused before anything compiles."""
  first = next(iter(task.train_dataset(p.prompts_per_step, 0)))
  if "codes" not in first:
    raise ValueError(
        f"rl.ptx_coef={p.rl.ptx_coef} needs ground-truth image tokens ('codes') in the training batches; "
        f"the {task.name!r} task's batches hold only {sorted(first)} (set rl.ptx_coef=0)"
    )


def supervised_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> rl.SupervisedBatch:
  """The step's P prompts with their ground-truth codes, replicated on the mesh (the supervised
  term of ``rl.ptx_coef``; every process holds the same batch)."""
  return rl.SupervisedBatch(
      prompt_tokens=parallel.global_replicated(np.asarray(batch["prompt_tokens"], np.int32), mesh),
      codes=parallel.global_replicated(np.asarray(batch["codes"], np.int32), mesh),
  )


_ADAPTER_SALT = 0x7FFF_FFF3  # fold_in salt of the adapters' init key (never an RL step)


def initial_state(
    task: tasks.Task, p: Plan, optimizer, shardings: rl.TrainState, params: Any, mesh: jax.sharding.Mesh, seed: int
) -> rl.TrainState:
  """The state of a fresh run from the base ``params``: full fine-tuning (with a reference copy
  when the KL term is on), or (``model_cfg.lora``) fresh adapters over ``params`` kept frozen as
  they are (attached after the jit, so the base is never copied)."""
  if task.model_cfg.lora is None:
    return jax.jit(new_state(optimizer, p), out_shardings=shardings)(params)
  key = jax.random.fold_in(jax.random.PRNGKey(seed), _ADAPTER_SALT)
  adapters = policy.init_adapters(task.model_cfg, task.layout, key, mesh)
  create = lambda a: rl.TrainState.create(a, optimizer, with_reference=False)
  state = jax.jit(create, out_shardings=shardings.without_frozen())(adapters)
  return state.replace(frozen=params)


class _Evaluator:
  """Held-out evaluations of a run: sampled on every process, judged once (process 0, shared),
  written by process 0 (``eval_stepNNNNN.md``, grid, samples, TensorBoard, curve, results.md)."""

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      task: tasks.Task,
      p: Plan,
      programs: Programs,
      runlog: writer.RunLog,
      workdir: str,
  ):
    self.config, self.task, self.p, self.programs = config, task, p, programs
    self.runlog, self.workdir = runlog, workdir
    self.key = eval_key(config)
    self.score, self.judge = rollouts.scorers_once(task.score, task.judge)

  def __call__(self, step: int, params: Any) -> dict[str, float]:
    """Scores ``params`` after ``step`` steps; returns the per-tag scores (+ overall)."""
    config = self.config
    # The base and the final policy (results.md's two columns) get more samples per prompt.
    final = step == 0 or step == config.total_steps
    n = config.eval.get("final_samples_per_prompt", 1) if final else config.eval.get("samples_per_prompt", 1)
    res = evaluate.evaluate_policy(
        self.programs.sampler,
        params,
        self.task.layout,
        self.programs.decode,
        self.task.eval_prompts,
        self.key,
        score=self.score,
        samples_per_prompt=n,
        batch_size=self.p.eval_batch_size,
        judge=self.judge,
    )
    label = "base" if step == 0 else f"step {step}"
    writer.write_eval(
        self.workdir, f"step{step:05d}", res, f"{self.task.name} held-out, {label}", config.eval.grid_size
    )
    self.runlog.tb_scalars(step, {f"eval/{k}": v for k, v in {**res["scores"], **evaluate.eval_watch(res)}.items()})
    return res["scores"]  # the hacking watch lives in the eval table and TensorBoard

  def report(self, loop: LoopState) -> str:
    """The reward curve and results.md (first vs last evaluation); returns the table."""
    preset = self.config.rl.preset
    return writer.write_report(
        self.workdir,
        loop.history,
        loop.evals,
        curve_title=f"{preset} on {self.task.name}",
        table_title=f"{self.task.name} held-out ({preset})",
    )


class NonFiniteUpdateError(RuntimeError):
  """``max_consecutive_skips`` inner updates in a row were skipped as non-finite."""


def check_skips(config: ml_collections.ConfigDict, done: int, metrics: dict[str, Any], consecutive: int) -> int:
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
        "(resuming with changed optim.* needs --config.allow_config_change=True)."
    )
  return consecutive
