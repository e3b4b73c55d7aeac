"""The trainer on several JAX processes, end to end: ``tests.helpers.train_process`` runs the tiny
ShapeEval config as 2 processes x 2 fake CPU devices joined by a localhost coordinator (the
multi-host code path of a TPU slice). Only process 0 writes the run's files and prints, and calls
the reward and the evaluation's scorer (once per batch); Orbax saves from every process and
restores on another process count (2 x 2 and 2 x 4 devices onto 1 process of 1 device); a run whose
processes are all killed after a checkpoint resumes to the bit-identical end of the uninterrupted
run; 4 processes of 1 device end where 2 of 2 do."""

import json
import os
import signal
import time

import jax
import pytest

from htgrpo_jax import checkpoint, tasks, trainer
from tests.helpers import multiprocess
from tests.helpers.configs import tiny_config

MODULE = ["-m", "tests.helpers.train_process"]
# Two steps, a save and an evaluation after each (the kill below lands in the evaluation of step
# 1, after its checkpoint), one sample per held-out prompt: the multi-host paths at least cost.
RUN = [
    "total_steps=2",
    "save_every=1",
    "eval_every=1",
    "keep_checkpoints=3",
    "eval.at_start=False",
    "eval.final_samples_per_prompt=1",
]
# Lines only process 0 may print: the trainer's log, the bar's lines, the bar itself.
PRIMARY_LINES = ("held-out overall", "htgrpo RL", "| **overall** |")
RUN_FILES = (
    "config.json",
    "config_history.jsonl",
    "metrics.jsonl",
    "results.md",
    "reward_curve.png",
    "eval_step00001.md",
    "eval_step00002.md",
    "grid_step00002.png",
    os.path.join("evals", "step00002", "samples.jsonl"),
)


def _results(out):
  """The ``RESULT`` record of every process (asserting each exited 0)."""
  recs = []
  for code, text in out:
    assert code == 0, text[-5000:]
    (line,) = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    recs.append(json.loads(line[len("RESULT ") :]))
  return recs


def _prompt_log(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["prompts"]) for r in map(json.loads, f)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """The tiny world and base policy, built once here (one process), for every run below."""
  root = tmp_path_factory.mktemp("multihost_trainer")
  tasks.build_task(tiny_config(root, "build"), log=lambda s: None)
  return root


@pytest.fixture(scope="module")
def two_process_run(root):
  """An uninterrupted 2-step run on 2 processes x 2 devices, with the progress bar on."""
  out = multiprocess.run(
      [*MODULE, str(root), "full", "progress=True", *RUN], num_processes=2, devices_per_process=2, timeout=600
  )
  return out, _results(out)


def test_two_processes_train_and_only_process_0_writes_and_prints(root, two_process_run):
  out, (p0, p1) = two_process_run
  assert (p0["process"], p1["process"], p0["processes"]) == (0, 1, 2)
  assert p0["step"] == p1["step"] == 2 and p0["evals"] == p1["evals"]
  assert sorted(p0["evals"]) == ["1", "2"]
  assert p0["checksums"] == p1["checksums"]  # one global state, read from either process
  wd = root / "full"
  for name in RUN_FILES:
    assert os.path.getsize(wd / name) > 0, name
  # Every line once: a second writer would have duplicated them.
  assert [s for s, _ in _prompt_log(wd)] == [1, 2]
  assert [f for f in os.listdir(wd / "tb") if f.startswith("events.out.tfevents")]
  assert len(os.listdir(wd / "tb")) == 1
  # The reward and the evaluation's scorer and judge ran once per batch, on process 0 (a reward
  # server or a remote scorer gets one request per batch, not one per host): 2 RL steps of 4 prompts
  # x G = 4, 2 evaluations of 16 held-out prompts in one batch each.
  assert p0["host_calls"]["reward"] == [2, 32], p0["host_calls"]
  # (An evaluation asks the judge when the task has one, its scorer otherwise.)
  judged = [a + b for a, b in zip(*(p0["host_calls"].get(k, [0, 0]) for k in ("score", "judge")))]
  assert judged == [2, 32], p0["host_calls"]
  assert all(n == [0, 0] for n in p1["host_calls"].values()), p1["host_calls"]
  assert p1["writes"] == [], p1["writes"]  # process 1 opened nothing for writing ...
  written = {w.removesuffix(".tmp") for w in p0["writes"]}  # atomic writes go through NAME.tmp
  assert {"metrics.jsonl", "results.md", "config_history.jsonl"} <= written, p0["writes"]
  text0, text1 = out[0][1], out[1][1]
  for line in PRIMARY_LINES:  # ... and printed nothing of the run's
    assert line in text0, line
    assert line not in text1, (line, text1[-3000:])
  # Orbax saved from both processes: every step committed, each with its manifest.
  assert checkpoint.step_dirs(wd / "checkpoints") == [1, 2]
  assert os.path.isdir(wd / "checkpoints" / "2" / "manifest")


def test_two_process_checkpoint_restores_on_one_process_and_device(root, two_process_run):
  _, (p0, _) = two_process_run
  cfg = tiny_config(root, "full", **{"mesh.num_devices": 1})
  out = trainer.evaluate_checkpoint(cfg, which="latest", out_dir=str(root / "one_device_eval"), log=lambda s: None)
  assert out["name"] == "step2"
  leaf = jax.tree.leaves(out["params"])[0]
  assert len(leaf.sharding.device_set) == 1
  # The params the 2 processes ended with, bit for bit (checksums do not depend on the sharding).
  assert checkpoint.leaf_checksums(out["params"]) == p0["checksums"]
  assert os.path.getsize(root / "one_device_eval" / "eval_step2.md") > 0


@pytest.mark.slow
def test_a_checkpoint_of_two_processes_of_four_devices_restores_on_one_process(root):
  """2 processes x 4 devices (an 8-way mesh: each process holds half of every batch) save a step;
  one process on one device restores the params bit for bit and evaluates them."""
  out = multiprocess.run(
      [
          *MODULE,
          str(root),
          "two_by_four",
          "total_steps=1",
          "save_every=1",
          "eval_every=1",
          "eval.at_start=False",
          "eval.final_samples_per_prompt=1",
      ],
      num_processes=2,
      devices_per_process=4,
      timeout=900,
  )
  p0, p1 = _results(out)
  assert (p0["processes"], p0["step"], p1["step"]) == (2, 1, 1) and p0["checksums"] == p1["checksums"]
  assert checkpoint.step_dirs(root / "two_by_four" / "checkpoints") == [1]
  cfg = tiny_config(root, "two_by_four", **{"mesh.num_devices": 1})
  got = trainer.evaluate_checkpoint(cfg, which="latest", out_dir=str(root / "two_by_four_eval"), log=lambda s: None)
  assert got["name"] == "step1" and len(jax.tree.leaves(got["params"])[0].sharding.device_set) == 1
  assert checkpoint.leaf_checksums(got["params"]) == p0["checksums"]


@pytest.mark.slow
def test_all_processes_killed_after_a_checkpoint_resume_bit_identical(root, two_process_run):
  _, (reference, _) = two_process_run
  wd = root / "killed"
  argv = [*MODULE, str(root), "killed", *RUN]
  procs = multiprocess.start(argv, num_processes=2, devices_per_process=2)
  ckpts = wd / "checkpoints"
  try:
    deadline = time.time() + 400
    while time.time() < deadline and all(p.poll() is None for p in procs):
      if 1 in checkpoint.step_dirs(ckpts):
        break
      time.sleep(0.2)
    assert all(p.poll() is None for p in procs), "a process ended before the kill"
  finally:
    for p in procs:  # kill -9, every process, no chance to save
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    for p in procs:
      p.communicate()
  saved = checkpoint.step_dirs(ckpts)
  assert saved == [1], saved
  out = multiprocess.run(argv, num_processes=2, devices_per_process=2, timeout=600)
  p0, p1 = _results(out)
  assert "Resumed" in out[0][1] and "Resumed" not in out[1][1]
  assert p0["step"] == 2 and p0["checksums"] == p1["checksums"] == reference["checksums"]
  assert p0["evals"] == reference["evals"]
  assert _prompt_log(wd) == _prompt_log(root / "full")


@pytest.mark.slow
def test_four_processes_of_one_device_train_like_two_of_two(root, two_process_run):
  """The same 4-device mesh spread over 4 processes: one writer, the same final params."""
  _, (reference, _) = two_process_run
  out = multiprocess.run([*MODULE, str(root), "four", *RUN], num_processes=4, devices_per_process=1, timeout=900)
  recs = _results(out)
  assert [r["process"] for r in recs] == [0, 1, 2, 3] and recs[0]["step"] == 2
  assert all(r["writes"] == [] for r in recs[1:]), [r["writes"] for r in recs]
  assert recs[0]["host_calls"]["reward"] == [2, 32]  # scored on process 0 only
  assert all(n == [0, 0] for r in recs[1:] for n in r["host_calls"].values())
  assert all(r["checksums"] == reference["checksums"] for r in recs)
  assert checkpoint.step_dirs(root / "four" / "checkpoints") == [1, 2]
