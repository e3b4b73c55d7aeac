"""One process of a multi-process trainer test: ``python -m tests.helpers.train_process ROOT NAME
[key=value ...]`` runs ``trainer.train`` on ``tiny_config(ROOT, NAME)`` with the dotted keys set
(values parsed as Python literals) and prints, last, one ``RESULT {json}`` line: the process index,
the step reached, the final params' checksums (sharding-independent, ``checkpoint.leaf_checksums``)
every file this process opened for writing under the workdir outside ``checkpoints/`` (Orbax
writes there from every process by design; everything else is process 0's), and ``host_calls``:
how many times, and on how many rows, this process called the task's RL reward, evaluation scorer
and judge (``{name: [calls, rows]}``; a reward server or a remote scorer sees one request per call).

Started by ``tests.helpers.multiprocess`` (the coordinator environment set), so the trainer joins
the other processes through ``jax.distributed``.
"""

import ast
import builtins
import json
import os
import pathlib
import sys


def _watch_writes(workdir: str) -> list[str]:
  """Records the paths under ``workdir`` (but ``checkpoints/``) this process opens to write."""
  seen: list[str] = []
  real_open = builtins.open
  root = os.path.abspath(workdir) + os.sep
  skip = os.path.join(root, "checkpoints") + os.sep

  def open_(file, mode="r", *a, **k):
    if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
      path = os.path.abspath(os.fspath(file))
      if path.startswith(root) and not path.startswith(skip):
        seen.append(os.path.relpath(path, root))
    return real_open(file, mode, *a, **k)

  builtins.open = open_
  return seen


class _Counted:
  """The task's ``fn`` (a reward, scorer or judge), counting its calls and rows in ``calls[key]``."""

  def __init__(self, fn, key: str, calls: dict):
    self.fn, self.key, self.calls = fn, key, calls
    self.name = getattr(fn, "name", getattr(fn, "__name__", key))  # the reward's metric name
    calls[key] = [0, 0]

  def __call__(self, prompts, *a, **k):
    self.calls[self.key][0] += 1
    self.calls[self.key][1] += len(prompts)
    return self.fn(prompts, *a, **k)


def _count_host_calls() -> dict:
  """Wraps the reward, scorer and judge of every task ``tasks.build_task`` builds in this process."""
  from htgrpo_jax import tasks
  from htgrpo_jax.rewards.base import WeightedReward

  calls: dict = {}
  build = tasks.build_task

  def build_counted(*a, **k):
    task = build(*a, **k)
    if not isinstance(task.reward, WeightedReward):  # a weighted sum is scored by its parts
      task.reward = _Counted(task.reward, "reward", calls)
    for key in ("score", "judge"):
      if getattr(task, key) is not None:
        setattr(task, key, _Counted(getattr(task, key), key, calls))
    return task

  tasks.build_task = build_counted
  return calls


def main(argv: list[str]) -> None:
  root, name, *over = argv
  from tests.helpers.configs import tiny_config

  cfg = tiny_config(pathlib.Path(root), name, **{k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in over)})
  writes = _watch_writes(cfg.workdir)
  calls = _count_host_calls()
  from htgrpo_jax import checkpoint, trainer

  out = trainer.train(cfg)  # log=print: process 0's lines only
  import jax

  sums = checkpoint.leaf_checksums(out["params"])
  print(
      "RESULT "
      + json.dumps(
          dict(
              process=jax.process_index(),
              processes=jax.process_count(),
              step=out["step"],
              checksums=sums,
              writes=sorted(set(writes)),
              host_calls=calls,
              evals={str(k): v for k, v in out["evals"].items()},
          )
      ),
      flush=True,
  )


if __name__ == "__main__":
  main(sys.argv[1:])
