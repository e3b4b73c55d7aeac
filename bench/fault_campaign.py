"""A randomised fault campaign on the tiny ShapeEval config: kill, break and restart training runs,
then check that nothing was lost and that every run still ends bit-identical to an uninterrupted one.

  python bench/fault_campaign.py --trials 3 --faults 3            # ~10 min on a 2-core CPU
  python bench/fault_campaign.py --trials 20 --faults 4 --seed 1  # the full campaign

One uninterrupted reference run first; then, per trial, the same run (its own workdir) started
again and again until it completes, each start carrying one randomly drawn fault:

  sigkill          SIGKILL from outside at a random moment (startup, rollout, save, evaluation, ...)
  sigterm          SIGTERM at a random moment: the run must save its last step and exit cleanly
  kill_in_save     SIGKILL inside an async save, after the arrays are written, before the commit
  kill_in_cleanup  SIGKILL inside keep-N deletion (before the rename / halfway through the trash)
  reward_error     the reward raises at a random step        } the run must stop with every save
  nan_reward       the reward returns NaN at a random step   } it started committed
  eval_error       the evaluation scorer raises              }

After every start it checks what is on disk: the newest save a cleanly stopping run started is
committed, the next start resumes from the newest committed step (no 'CORRUPT CHECKPOINT', no
silent restart), and no committed step holds a NaN/inf. At the end of a trial its final checkpoint
(arrays, data-iterator and loop JSON, i.e. reward history and evaluations) is compared bit for bit
with the reference. ``--child`` is the instrumented training process the driver starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS = ("sigkill", "sigterm", "kill_in_save", "kill_in_cleanup", "reward_error", "nan_reward", "eval_error")


def campaign_config(root: str, workdir: str, total_steps: int):
  from htgrpo_jax import tasks

  cfg = tasks.load_config_file(os.path.join(REPO, "configs", "geneval.py"), "htgrpo,tiny")
  cfg.world.data_dir = os.path.join(root, "world")
  cfg.model.checkpoint = os.path.join(root, "base")
  cfg.workdir = workdir
  cfg.progress = False
  cfg.total_steps = total_steps
  cfg.save_every = 2  # saves at 2, 4, ...; a SIGTERM at an odd step saves that step
  cfg.keep_checkpoints = 2  # keep-N deletion from the third save on
  cfg.eval_every = 4
  return cfg


# ------------------------------------------------------------------------------------------------
# The instrumented child


def child(args) -> int:
  import numpy as np
  from htgrpo_jax import checkpoint, tasks, trainer
  from orbax.checkpoint._src.path import atomicity, deleter

  markers = open(args.markers, "a", buffering=1)

  def mark(s: str) -> None:
    markers.write(s + "\n")
    markers.flush()
    os.fsync(markers.fileno())

  def die(what: str) -> None:
    mark(f"SELF_KILL {what}")
    os.kill(os.getpid(), signal.SIGKILL)

  fault, at = args.fault, args.at
  real_build = tasks.build_task

  def build(config, log=print):
    task = real_build(config, log=log)
    calls = {"reward": 0, "score": 0}

    def reward(prompts, images, **meta):
      calls["reward"] += 1
      mark(f"REWARD {calls['reward']}")
      if fault == "reward_error" and calls["reward"] == at:
        mark("RAISE reward")
        raise RuntimeError("injected reward failure")
      if fault == "nan_reward" and calls["reward"] == at:
        mark("RAISE nan_reward")
        return np.full((len(prompts),), np.nan, np.float32)
      return task.reward(prompts, images, **meta)

    def scorer(fn):  # the evaluation's scorer, and its judge (used instead where there is one)
      def wrapped(prompts, images, meta):
        calls["score"] += 1
        if fault == "eval_error" and calls["score"] == at:
          mark("RAISE eval")
          raise RuntimeError("injected evaluation failure")
        return fn(prompts, images, meta)

      return None if fn is None else wrapped

    return dataclasses.replace(task, reward=reward, score=scorer(task.score), judge=scorer(task.judge))

  tasks.build_task = build

  real_save = checkpoint.RunCheckpointer.save

  def save(self, step, *a, **k):
    mark(f"SAVE_START {step}")
    return real_save(self, step, *a, **k)

  checkpoint.RunCheckpointer.save = save

  real_finalize = atomicity.AtomicRenameTemporaryPath.finalize
  commits = [0]

  async def finalize(self, *a, **k):
    name = self._final_path.name
    if name.isdigit():  # the step folder's commit (items commit inside it first)
      commits[0] += 1
      if fault == "kill_in_save" and commits[0] == at:
        die(f"save {name}")
    out = await real_finalize(self, *a, **k)
    if name.isdigit():
      mark(f"COMMITTED {name}")
    return out

  atomicity.AtomicRenameTemporaryPath.finalize = finalize

  real_delete = deleter.StandardCheckpointDeleter.delete
  deletes = [0]

  def delete(self, step):
    deletes[0] += 1
    if fault == "kill_in_cleanup" and args.variant == "before_rename" and deletes[0] == at:
      die(f"delete {step}")
    return real_delete(self, step)

  deleter.StandardCheckpointDeleter.delete = delete

  real_rmtree = checkpoint.shutil.rmtree
  trashes = [0]

  def rmtree(path, *a, **k):
    if os.path.basename(os.fspath(path)) == "trash" and os.path.isdir(path) and os.listdir(path):
      trashes[0] += 1
      if fault == "kill_in_cleanup" and args.variant == "mid_trash" and trashes[0] == at:
        files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
        for f in files[: len(files) // 2]:
          os.remove(f)
        die(f"trash {path}")
    return real_rmtree(path, *a, **k)

  checkpoint.shutil.rmtree = rmtree

  cfg = campaign_config(args.root, args.workdir, args.total_steps)
  if args.fault == "prepare":  # build the world and pretrain the base, nothing else
    real_build(cfg)
    return 0
  out = trainer.train(cfg, log=lambda s: print(s, flush=True))
  print(f"RESULT step={out['step']} interrupted={out.get('interrupted')}", flush=True)
  return 0


# ------------------------------------------------------------------------------------------------
# The driver


def _env(root: str) -> dict[str, str]:
  env = dict(
      os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1"
  )
  # Later starts reuse the compiled programs (the same executables: results are unchanged).
  env.update(
      JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  return env


@dataclasses.dataclass
class Start:
  """One child start: its fault; ``at`` counts the child's reward calls / commits / deletions /
  evaluation calls; a signal goes ``delay`` s after the ``after``-th reward call (0: after spawn)."""

  fault: str
  at: int = 0
  variant: str = ""
  delay: float = 0.0
  after: int = 0


class Driver:

  def __init__(self, args):
    self.args, self.root = args, os.path.abspath(args.root)
    self.rng = random.Random(args.seed)
    self.kills = {"SIGKILL": 0, "SIGTERM": 0}
    self.delivered = {f: 0 for f in FAULTS}
    self.resumes = self.lost = 0
    self.nan = False
    self.problems: list[str] = []
    self.starts = 0
    self._checked: dict[str, float] = {}
    self._bag: list[str] = []

  def run_child(self, workdir: str, start: Start, timeout: float = 900):
    markers = os.path.join(workdir + ".markers")
    open(markers, "w").close()
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        f"--root={self.root}",
        f"--workdir={workdir}",
        f"--markers={markers}",
        f"--total_steps={self.args.total_steps}",
        f"--fault={start.fault}",
        f"--at={start.at}",
        f"--variant={start.variant}",
    ]
    log = open(workdir + ".log", "a")
    log.write(f"\n===== start: {start}\n")
    log.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=_env(self.root), stdout=log, stderr=subprocess.STDOUT)
    sent, first_reward = None, None
    fire_at = start.delay if start.after == 0 else None
    while proc.poll() is None:
      now = time.monotonic() - t0
      if os.path.getsize(markers):
        with open(markers) as f:
          rewards = f.read().count("REWARD")
        if first_reward is None and rewards:
          first_reward = now
        if fire_at is None and start.after and rewards >= start.after:
          fire_at = now + start.delay
      if sent is None and start.fault in ("sigkill", "sigterm") and fire_at is not None and now >= fire_at:
        with open(workdir + ".log") as f:
          finished = "RESULT step=" in f.read().split(f"===== start: {start}")[-1]
        if finished:  # train() returned: the process is only exiting, nothing left to hit
          fire_at = float("inf")
        else:
          sent = signal.SIGKILL if start.fault == "sigkill" else signal.SIGTERM
          proc.send_signal(sent)
      if now > timeout:
        proc.kill()
        self.problems.append(f"{workdir}: a start hung for {timeout} s ({start})")
      time.sleep(0.05)
    rc = proc.returncode
    self.first_reward_s = first_reward
    log.close()
    with open(markers) as f:
      marks = [ln.split() for ln in f if ln.strip()]
    with open(workdir + ".log") as f:
      text = f.read().split(f"===== start: {start}")[-1]
    return rc, sent, marks, text, time.monotonic() - t0

  def committed(self, workdir: str) -> list[int]:
    from htgrpo_jax.checkpoint import step_dirs

    return step_dirs(os.path.join(workdir, "checkpoints"))

  def load_step(self, workdir: str, step: int):
    """(state leaves as numpy, data JSON, loop JSON) of a committed step, read without a target."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    d = os.path.join(workdir, "checkpoints", str(step))
    with ocp.StandardCheckpointer() as ck:
      state = ck.restore(os.path.join(d, "state"))
    leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
    js = {}
    for item in ("data", "loop"):
      with open(os.path.join(d, item, "metadata")) as f:
        js[item] = json.load(f)
    return leaves, js["data"], js["loop"]

  def check_nan(self, workdir: str) -> None:
    import numpy as np

    for s in self.committed(workdir):
      d = os.path.join(workdir, "checkpoints", str(s))
      key = f"{d}@{os.path.getmtime(d)}"
      if key in self._checked:
        continue
      self._checked[key] = 1
      leaves, _, _ = self.load_step(workdir, s)
      if any(x.dtype.kind == "f" and not np.isfinite(x).all() for x in leaves):
        self.nan = True
        self.problems.append(f"{d}: non-finite values written")

  def draw(self, remaining_steps: int) -> Start:
    if not self._bag:  # every kind equally often, in a random order
      self._bag = list(FAULTS)
      self.rng.shuffle(self._bag)
    f = self._bag.pop()
    r = max(remaining_steps, 1)
    if f in ("sigkill", "sigterm"):
      if self.rng.random() < 0.2:  # anywhere from startup (world, compile, base eval) on
        return Start(f, delay=self.rng.uniform(0.5, self.t_first_step or 5.0))
      # Inside the loop: rollout, reward, update, async save, keep-N deletion, evaluation.
      return Start(f, after=self.rng.randint(1, r), delay=self.rng.uniform(0.0, 2.0))
    if f in ("reward_error", "nan_reward"):
      return Start(f, at=self.rng.randint(1, r))
    if f == "eval_error":
      return Start(f, at=self.rng.randint(1, 2))
    if f == "kill_in_save":
      return Start(f, at=self.rng.randint(1, max(r // 2, 1)))
    variant = self.rng.choice(["before_rename", "mid_trash"])
    return Start(f, at=self.rng.randint(1, max(r // 2 - 2, 1)), variant=variant)

  def reference(self) -> None:
    if not os.path.isdir(os.path.join(self.root, "base", "params")):
      rc = self.run_child(os.path.join(self.root, "prepare"), Start("prepare"))[0]
      if rc != 0:
        raise SystemExit(f"building the world / base policy failed (rc {rc}); see " f"{self.root}/prepare.log")
    wd = os.path.join(self.root, "reference")
    rc, _, marks, text, secs = self.run_child(wd, Start("none"))
    if rc != 0:
      raise SystemExit(f"the reference run failed (rc {rc}); see {wd}.log")
    self.t_first_step = self.first_reward_s or secs * 0.4  # startup, for kills before the loop
    self.ref = self.load_step(wd, self.args.total_steps)

  def trial(self, t: int, bar) -> bool:
    wd = os.path.join(self.root, f"trial{t:02d}")
    shutil.rmtree(wd, ignore_errors=True)
    faults_left, starts = self.args.faults, 0
    while True:
      starts += 1
      before = self.committed(wd)
      if starts > self.args.faults + 6:
        self.problems.append(f"{wd}: did not complete after {starts - 1} starts")
        return False
      done_before = max(before) if before else 0
      start = self.draw(self.args.total_steps - done_before) if faults_left else Start("none")
      rc, sent, marks, text, _ = self.run_child(wd, start)
      self.starts += 1
      after = self.committed(wd)
      kinds = [m[0] for m in marks]
      delivered = sent is not None or "SELF_KILL" in kinds or "RAISE" in kinds
      if start.fault != "none" and delivered:
        faults_left -= 1
        self.delivered[start.fault] += 1
      if sent is not None or "SELF_KILL" in kinds:
        self.kills["SIGTERM" if sent == signal.SIGTERM else "SIGKILL"] += 1
      # Resumed from the newest committed step, never a fallback or a silent fresh start.
      if before:
        if f"at step {max(before)}." in text and "Resumed" in text:
          self.resumes += 1
        elif "Resumed" in text or "REWARD" in kinds or "RESULT" in text:
          self.lost += 1
          self.problems.append(f"{wd}: start {starts} did not resume from step {max(before)}")
      if "CORRUPT CHECKPOINT" in text:
        self.lost += 1
        self.problems.append(f"{wd}: start {starts} found a corrupt checkpoint")
      # A run that stopped on its own (exception, SIGTERM) committed the newest save it started,
      # and every step it completed that is due a save (after SIGTERM: the step it stopped at).
      started = [int(m[1]) for m in marks if m[0] == "SAVE_START"]
      graceful = "SELF_KILL" not in kinds and sent != signal.SIGKILL and rc != -signal.SIGKILL
      rewards = kinds.count("REWARD")
      failed_step = any(m[:2] in (["RAISE", "reward"], ["RAISE", "nan_reward"]) for m in marks)
      completed = done_before + rewards - (1 if failed_step else 0)
      due = completed if sent == signal.SIGTERM else completed - completed % 2  # save_every = 2
      newest = max(after) if after else 0
      if graceful and ((started and max(started) not in after) or newest < due):
        self.lost += 1
        self.problems.append(
            f"{wd}: start {starts} ({start}) stopped at step {completed} with "
            f"step {newest} the newest on disk, not {due} (rc {rc})"
        )
      if sent == signal.SIGTERM and "RESULT" in text and rc != 0:
        self.problems.append(f"{wd}: SIGTERM did not exit cleanly (rc {rc})")
      self.check_nan(wd)
      bar.set_postfix(trial=t, start=starts, kills=sum(self.kills.values()), resumes=self.resumes, lost=self.lost)
      bar.update(0)
      if rc == 0 and f"RESULT step={self.args.total_steps}" in text:
        break
      if rc != 0 and start.fault == "none":
        self.problems.append(f"{wd}: a start without a fault failed (rc {rc}); see {wd}.log")
        return False
    import numpy as np

    leaves, data, loop = self.load_step(wd, self.args.total_steps)
    ref_leaves, ref_data, ref_loop = self.ref
    same = (
        len(leaves) == len(ref_leaves)
        and all(a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b) for a, b in zip(leaves, ref_leaves))
        and data == ref_data
        and loop == ref_loop
    )
    if not same:
      self.problems.append(f"{wd}: final state differs from the reference")
    return same


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--trials", type=int, default=3)
  ap.add_argument("--faults", type=int, default=3, help="faults per trial")
  ap.add_argument("--total_steps", type=int, default=8)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--root", default="runs/fault_campaign")
  ap.add_argument("--keep", action="store_true", help="keep an existing root (world, base, cache)")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--workdir", help=argparse.SUPPRESS)
  ap.add_argument("--markers", help=argparse.SUPPRESS)
  ap.add_argument("--fault", default="none", help=argparse.SUPPRESS)
  ap.add_argument("--at", type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  sys.path.insert(0, REPO)  # this checkout's htgrpo_jax, installed or not
  if args.child:
    return child(args)

  os.environ.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  from tqdm import tqdm

  root = os.path.abspath(args.root)
  if os.path.isdir(root) and not args.keep:
    for name in os.listdir(root):
      if name not in ("world", "base", "jax_cache"):
        shutil.rmtree(os.path.join(root, name), ignore_errors=True) if os.path.isdir(
            os.path.join(root, name)
        ) else os.remove(os.path.join(root, name))
  os.makedirs(root, exist_ok=True)
  t0 = time.time()
  drv = Driver(args)
  print(
      f"fault campaign: {args.trials} trials x {args.faults} faults, configs/geneval.py:htgrpo,tiny "
      f"(total_steps={args.total_steps}, save_every=2, keep_checkpoints=2, eval_every=4), "
      f"seed {args.seed}, under {root}",
      flush=True,
  )
  print("reference run (uninterrupted)...", flush=True)
  drv.reference()
  identical = 0
  with tqdm(total=args.trials, desc="fault campaign", unit="trial", dynamic_ncols=True) as bar:
    for t in range(args.trials):
      identical += drv.trial(t, bar)
      bar.update(1)
  mins, secs = divmod(int(time.time() - t0), 60)
  delivered = ", ".join(f"{k} {v}" for k, v in drv.delivered.items() if v)
  print(f"\nfault campaign, {args.trials} trials, seed {args.seed} ({mins} min {secs} s)")
  print(f"  starts           : {drv.starts} (+1 reference)")
  print(f"  faults delivered : {sum(drv.delivered.values())} ({delivered})")
  print(
      f"  kills            : {sum(drv.kills.values())} (SIGKILL {drv.kills['SIGKILL']}, "
      f"SIGTERM {drv.kills['SIGTERM']})"
  )
  print(f"  resumes          : {drv.resumes}")
  print(f"  bit-identical    : {identical}/{args.trials} " f"({'yes' if identical == args.trials else 'no'})")
  print(f"  checkpoints lost : {drv.lost}")
  print(f"  NaN ever written : {'yes' if drv.nan else 'no'}")
  for p in drv.problems:
    print(f"  PROBLEM: {p}")
  ok = identical == args.trials and drv.lost == 0 and not drv.nan and not drv.problems
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
