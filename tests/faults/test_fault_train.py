"""Trainer faults on the tiny ShapeEval config: reward errors, NaN rewards and interrupts while an
async save is pending, SIGTERM, time-based saves, runs of skipped updates, bad optim.* values, a
locked workdir, a resumed run with another meaning, and a failing evaluation. Every faulted run
that is restarted ends bit-identical to the uninterrupted reference."""

import asyncio
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from htgrpo_jax import parallel, rl, tasks, trainer
from tests.helpers.configs import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REAL_BUILD = tasks.build_task


def quiet(_):
  pass


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def reference(root):
  """The uninterrupted 4-step run (pretrains the tiny base first)."""
  return trainer.train(tiny_config(root, "reference"), log=quiet)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_same(a, b):
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _steps(cfg):
  d = os.path.join(cfg.workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _inject(monkeypatch, reward=None, score=None):
  """Wraps the task's reward / eval scorer: ``reward(n)`` / ``score(n)`` run before the n-th call
  (1-based) and may raise, return 'nan' (the reward then answers NaN) or do anything else."""

  def build(config, log=print):
    task = REAL_BUILD(config, log=log)
    calls = {"reward": 0, "score": 0}

    def faulty_reward(prompts, images, **meta):
      calls["reward"] += 1
      if reward is not None and reward(calls["reward"]) == "nan":
        return np.full((len(prompts),), np.nan, np.float32)
      return task.reward(prompts, images, **meta)

    def faulty(fn):  # the evaluation's scorer, and its judge (used instead where there is one)
      def wrapped(prompts, images, meta):
        calls["score"] += 1
        if score is not None:
          score(calls["score"])
        return fn(prompts, images, meta)

      return None if fn is None else wrapped

    return dataclasses.replace(task, reward=faulty_reward, score=faulty(task.score), judge=faulty(task.judge))

  monkeypatch.setattr(tasks, "build_task", build)


@pytest.fixture
def slow_saves(monkeypatch):
  """Makes every Orbax commit (the tmp -> final rename) wait 1 s, like a slow bucket, so a save
  is still pending when the next step fails."""
  from orbax.checkpoint._src.path import atomicity

  real = atomicity.AtomicRenameTemporaryPath.finalize

  async def slow(self, *a, **k):
    await asyncio.sleep(1.0)
    return await real(self, *a, **k)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", slow)


# ------------------------------------------------------------------------------------------------
# 1. every exit path finishes the pending save


# One fault in the default run; the other two exits share its code path (the try/finally).
@pytest.mark.parametrize(
    "fault",
    ["error", pytest.param("nan_reward", marks=pytest.mark.slow), pytest.param("interrupt", marks=pytest.mark.slow)],
)
def test_fault_while_a_save_is_pending_keeps_that_checkpoint(root, reference, monkeypatch, slow_saves, fault):
  # No evaluation between the save of step 2 and step 3 (nor of the base: it is not compared).
  cfg = tiny_config(root, f"pending_{fault}", eval_every=100, **{"eval.at_start": False})

  def reward(n):
    if n == 3:  # step 3, right after the async save of step 2 started
      if fault == "error":
        raise RuntimeError("reward server exploded")
      if fault == "interrupt":
        raise KeyboardInterrupt
      return "nan"

  _inject(monkeypatch, reward=reward)
  expect = {"error": RuntimeError, "nan_reward": ValueError, "interrupt": KeyboardInterrupt}[fault]
  with pytest.raises(expect):
    trainer.train(cfg, log=quiet)
  names = os.listdir(os.path.join(cfg.workdir, "checkpoints"))
  assert 2 in _steps(cfg) and not [n for n in names if "tmp" in n], names
  if fault == "error":
    monkeypatch.setattr(tasks, "build_task", REAL_BUILD)
    out = trainer.train(cfg, log=quiet)  # resumes at 2, not 0
    assert out["step"] == 4 and out["history"] == reference["history"]
    _assert_same(out["params"], reference["params"])


# ------------------------------------------------------------------------------------------------
# 2. SIGTERM and time-based saves


def test_sigterm_saves_the_current_step_and_stops_cleanly(root, reference, monkeypatch):
  cfg = tiny_config(root, "sigterm", save_every=3, eval_every=100, **{"eval.at_start": False})
  before = signal.getsignal(signal.SIGTERM)

  def reward(n):
    if n == 2:  # mid-step 2: the step finishes, is saved although 2 is no save_every step
      os.kill(os.getpid(), signal.SIGTERM)

  _inject(monkeypatch, reward=reward)
  lines = []
  out = trainer.train(cfg, log=lines.append)
  assert out["interrupted"] == "SIGTERM" and out["step"] == 2 and _steps(cfg) == [2]
  assert any("SIGTERM" in ln for ln in lines), lines
  assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
  monkeypatch.setattr(tasks, "build_task", REAL_BUILD)
  out = trainer.train(cfg, log=quiet)
  assert out["step"] == 4 and out["interrupted"] is None
  _assert_same(out["params"], reference["params"])


def test_a_stopped_run_exits_128_plus_the_signal_and_a_finished_one_0():
  """launch/train.py's exit status (trainer.exit_status): a supervisor restarts a stopped run."""
  assert trainer.exit_status(None) == 0
  assert trainer.exit_status("SIGTERM") == trainer.exit_status("preemption") == 143
  assert trainer.exit_status("SIGINT") == 130
  with pytest.raises(ValueError, match="interrupted='SIGHUP'"):
    trainer.exit_status("SIGHUP")


@pytest.mark.slow
def test_save_every_minutes_saves_between_save_every_steps(root):
  cfg = tiny_config(
      root,
      "timed",
      save_every=100,
      save_every_minutes=1e-6,
      keep_checkpoints=10,
      eval_every=100,
      **{"eval.at_start": False},
  )
  trainer.train(cfg, log=quiet)
  assert _steps(cfg) == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------
# 3. skipped updates: counted, never written, and a run of them stops the run by name


@pytest.mark.slow
def test_consecutive_skipped_updates_stop_the_run_by_name(root, monkeypatch):
  monkeypatch.setattr(trainer, "make_optimizer", lambda config, p: rl.make_optimizer(float("inf"), clip_norm=None))
  cfg = tiny_config(
      root,
      "skips",
      save_every=1,
      max_consecutive_skips=7,
      keep_checkpoints=5,
      eval_every=100,
      **{"eval.at_start": False},
  )
  with pytest.raises(trainer.NonFiniteUpdateError, match=r"9 consecutive.*step 3.*max_consecutive_skips=7"):
    trainer.train(cfg, log=quiet)
  assert _steps(cfg) == [1, 2]  # K = 3 skips per step: the third step crosses 7
  from htgrpo_jax import checkpoint

  for s in (1, 2):
    state = checkpoint.RunCheckpointer(os.path.join(cfg.workdir, "checkpoints")).restore(_abstract_state(cfg), step=s)[
        0
    ]
    assert all(np.isfinite(x).all() for x in _leaves(state) if x.dtype.kind == "f")
    assert int(state.skipped) == 3 * s


def _abstract_state(cfg):
  p = trainer.plan(cfg)
  mesh = parallel.make_mesh(**dict(cfg.mesh))
  task = tasks.build_task(cfg, log=quiet)
  return trainer.abstract_train_state(task, p, trainer.make_optimizer(cfg, p), mesh)[0]


# ------------------------------------------------------------------------------------------------
# 4. every optim.* key is validated in plan(), before anything is built


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("optim.max_grad_norm", -1.0, r"optim.max_grad_norm=-1.0: .*>= 0"),
        ("optim.learning_rate", float("inf"), "optim.learning_rate=inf"),
        ("optim.learning_rate", 0.0, "optim.learning_rate=0.0"),
        ("optim.b1", 1.0, r"optim.b1=1.0: .*\[0, 1\)"),
        ("optim.b2", -0.5, "optim.b2=-0.5"),
        ("optim.b2", float("nan"), "optim.b2=nan"),
        ("optim.warmup_steps", -1, "optim.warmup_steps=-1"),
        ("optim.weight_decay", float("nan"), "optim.weight_decay=nan"),
        ("optim.weight_decay", -0.1, "optim.weight_decay=-0.1"),
        ("optim.decay", "linear", r"optim.decay='linear': .*constant.*cosine"),
        ("optim.final_lr_fraction", 1.5, r"optim.final_lr_fraction=1.5: .*\[0, 1\]"),
        ("save_every_minutes", -1.0, "save_every_minutes=-1.0"),
        ("max_consecutive_skips", -1, "max_consecutive_skips=-1"),
    ],
)
def test_bad_optim_and_loop_values_fail_in_plan(root, monkeypatch, key, value, match):
  cfg = tiny_config(root, "bad_optim", **{key: value})
  with pytest.raises(ValueError, match=match):
    trainer.plan(cfg)

  def never(*a, **k):
    raise AssertionError("the task was built before the config was validated")

  monkeypatch.setattr(tasks, "build_task", never)
  with pytest.raises(ValueError, match=match):
    trainer.train(cfg, log=quiet)


def test_cosine_decay_warms_up_then_falls_to_its_floor_at_total_steps(root):
  """``optim.decay='cosine'``: 0 -> peak over the warm-up, then down to final_lr_fraction x peak at
  the last inner update of step total_steps (K inner updates per RL step), never below it."""
  from htgrpo_jax import run_config

  over = {"optim.learning_rate": 1e-3, "optim.warmup_steps": 1, "optim.decay": "cosine"}
  cfg = tiny_config(root, "cosine", **over, **{"optim.final_lr_fraction": 0.1})
  p = trainer.plan(cfg)
  k, total = p.rl.num_iterations, cfg.total_steps
  lr = run_config.learning_rate(cfg, p)
  values = np.array([float(lr(i)) for i in range(total * k + 1)])
  assert values[0] == 0.0 and values[k] == pytest.approx(1e-3)
  assert values[-1] == pytest.approx(1e-4) and values.min() >= 0.0
  assert np.all(np.diff(values[k:]) <= 1e-12) and np.all(values[k:] >= 1e-4 - 1e-12)
  # The constant default is what it was: the same warm-up, then the peak for good.
  const = run_config.learning_rate(tiny_config(root, "const", **{"optim.learning_rate": 1e-3}), p)
  assert float(const(0)) == 0.0 and float(const(total * k * 10)) == pytest.approx(1e-3)
  # A decay needs room after its warm-up.
  with pytest.raises(ValueError, match=r"optim.warmup_steps=4: a cosine decay needs it below total_steps=4"):
    trainer.plan(tiny_config(root, "cosine", **dict(over, **{"optim.warmup_steps": 4})))


def test_a_decaying_run_may_not_be_extended_on_resume(root):
  """A cosine schedule is written for its total_steps: resuming it with a larger one would jump
  the learning rate back up, so the config check refuses it (a constant rate may grow)."""
  from htgrpo_jax import workdir

  def js(**over):
    return json.loads(tiny_config(root, "grow", **over).to_json_best_effort())

  cos = {"optim.decay": "cosine"}
  refused, _ = workdir.compare_configs(js(**cos), js(total_steps=8, **cos))
  assert "total_steps" in refused
  refused, allowed = workdir.compare_configs(js(), js(total_steps=8))
  assert not refused and "total_steps" in allowed


def test_unknown_optim_key_is_named(root):
  cfg = tiny_config(root, "bad_optim")
  cfg.optim.lerning_rate = 1e-3
  with pytest.raises(ValueError, match="optim.lerning_rate"):
    trainer.plan(cfg)


# ------------------------------------------------------------------------------------------------
# 6. one run per workdir


def test_second_run_on_a_locked_workdir_is_refused_naming_the_holder(root, monkeypatch):
  cfg = tiny_config(root, "locked")
  os.makedirs(cfg.workdir, exist_ok=True)
  code = (
      "import sys, time; from htgrpo_jax.workdir import WorkdirLock; "
      "WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)"
  )
  holder = subprocess.Popen([sys.executable, "-c", code, cfg.workdir], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"

    def never(*a, **k):
      raise AssertionError("built a task in a locked workdir")

    monkeypatch.setattr(tasks, "build_task", never)
    from htgrpo_jax import workdir

    with pytest.raises(workdir.WorkdirLockedError, match=rf"host {socket.gethostname()}, pid {holder.pid}"):
      trainer.train(cfg, log=quiet)
  finally:
    holder.kill()  # SIGKILL: its lock is now stale
    holder.wait()
  lock = workdir.WorkdirLock(cfg.workdir).acquire()  # a dead holder does not block
  lock.release()


# ------------------------------------------------------------------------------------------------
# 7. a resumed run keeps its meaning


@pytest.mark.slow
def test_resume_with_another_meaning_is_refused_unless_allowed(root):
  from htgrpo_jax import workdir

  base = dict(eval_every=100, **{"eval.at_start": False})
  cfg = tiny_config(root, "changed", **base)
  trainer.train(cfg, log=quiet, stop_after=1)
  path = os.path.join(cfg.workdir, "config.json")
  saved = open(path).read()
  bad = tiny_config(root, "changed", seed=1, **{"optim.learning_rate": 2e-4}, **base)
  with pytest.raises(
      workdir.ConfigChangedError,
      match=r"(?s)(?=.*optim\.learning_rate: 0\.0001 -> 0\.0002)(?=.*seed: 0 -> 1)" r"(?=.*allow_config_change)",
  ):
    trainer.train(bad, log=quiet)
  assert open(path).read() == saved
  # Cadence / bookkeeping and a longer run pass; a shorter one does not.
  harmless = tiny_config(root, "changed", log_every=2, save_every=3, total_steps=6, keep_checkpoints=4, **base)
  refused, allowed = workdir.compare_configs(json.loads(saved), json.loads(harmless.to_json_best_effort()))
  assert not refused and set(allowed) == {"log_every", "save_every", "total_steps", "keep_checkpoints"}
  shorter = tiny_config(root, "changed", total_steps=3, **base)
  assert "total_steps" in workdir.compare_configs(json.loads(saved), json.loads(shorter.to_json_best_effort()))[0]
  # The explicit override proceeds, loudly, and every start is kept.
  bad.allow_config_change = True
  lines = []
  out = trainer.train(bad, log=lines.append, stop_after=1)
  assert out["step"] == 2 and any("allow_config_change=True" in ln for ln in lines)
  assert json.load(open(path))["seed"] == 1
  hist = [json.loads(ln) for ln in open(os.path.join(cfg.workdir, "config_history.jsonl"))]
  assert len(hist) == 2 and hist[0]["config"]["seed"] == 0 and hist[1]["changed"]["seed"] == [0, 1]


# ------------------------------------------------------------------------------------------------
# 8. the save of a step comes before its evaluation


@pytest.mark.slow
def test_failing_evaluation_keeps_its_steps_checkpoint(root, reference, monkeypatch):
  cfg = tiny_config(root, "evalfail")
  armed = {}

  def reward(n):
    if n == 2:
      armed["on"] = True

  def score(n):
    if armed.get("on"):
      raise RuntimeError("judge crashed")

  _inject(monkeypatch, reward=reward, score=score)
  with pytest.raises(RuntimeError, match="judge crashed"):
    trainer.train(cfg, log=quiet)
  assert _steps(cfg) == [2]
  monkeypatch.setattr(tasks, "build_task", REAL_BUILD)
  out = trainer.train(cfg, log=quiet)  # redoes the evaluation of step 2 first
  assert out["step"] == 4 and out["evals"] == reference["evals"]
  _assert_same(out["params"], reference["params"])
