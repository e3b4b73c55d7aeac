"""Runs (or resumes) an efficacy study: RL arms x seeds from one frozen base, equal rollout budgets.

  python launch/study.py --config=configs/study.py [--config.key=value ...] [--max_runs=N]
  python launch/study.py --config=configs/study.py:long --workers=16   # 16 runs at once (one GPU)

Writes the study's Markdown table with 95 % intervals and its PNG curves (configs/study.py says
where) after every finished run; a stopped study resumes where it was. ``--workers=N`` scores the
base, then trains the unfinished runs in N processes (every N-th run each) and writes the report
once they end: for a GPU host whose chip a single small run leaves idle (each worker is a JAX
process of its own, and a TPU chip admits only one process: --workers is for GPU and CPU hosts).
"""

import os
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/study.py", "Study config: path.py[:tiny].", lock_config=True
)
_MAX_RUNS = flags.DEFINE_integer("max_runs", None, "Stop after this many runs (resumable).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Train the runs in this many processes at once.")
_SHARD = flags.DEFINE_string(
    "shard",
    "",
    "i/n: this process trains every n-th unfinished run " "from i, writes no report (what --workers starts).",
)


def without_workers_flag(argv: list[str]) -> list[str]:
  """argv with ``--workers`` removed in every spelling absl accepts (``--workers=N``, ``--workers N``,
  one dash), so the shard processes do not start workers of their own."""
  out, skip = [], False
  for a in argv:
    flag = a.lstrip("-").split("=")[0] if a.startswith("-") else ""
    if not skip and flag != "workers":
      out.append(a)
    skip = flag == "workers" and "=" not in a
  return out


def worker_env(environ: dict[str, str]) -> dict[str, str]:
  """The shard processes' environment: ``environ`` with JAX's GPU memory preallocation off (unless
  it was set), since by default each process takes 75 % of the GPU's memory and the second of
  N workers on one GPU would run out. One H200 trained 16 at once this way (docs/findings.md, 8)."""
  return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", **environ}


def _run_workers(n: int) -> int:
  """Starts n shard processes with this process's flags; SIGTERM/SIGINT reach them all (each
  trainer saves and stops). Returns the number of workers that failed."""
  args = without_workers_flag(sys.argv[1:])
  env = worker_env(dict(os.environ))
  procs = [
      subprocess.Popen([sys.executable, os.path.abspath(__file__), *args, f"--shard={i}/{n}"], env=env)
      for i in range(n)
  ]

  def forward(signum, _):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  return sum(p.wait() != 0 for p in procs)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from htgrpo_jax import study

  if _SHARD.value:
    i, n = (int(x) for x in _SHARD.value.split("/"))
    if not 0 <= i < n:
      raise app.UsageError(f"--shard={_SHARD.value}: want i/n with 0 <= i < n")
    study.run_study(_CONFIG.value, max_runs=_MAX_RUNS.value, shard=(i, n), report=False)
    return
  if _WORKERS.value > 1:
    study.run_study(_CONFIG.value, max_runs=0)  # scores the base once, before the workers start
    failed = _run_workers(_WORKERS.value)
    print(study.write_report(_CONFIG.value))
    if failed:
      raise SystemExit(f"{failed} of {_WORKERS.value} study workers failed (see their output)")
    return
  print(study.run_study(_CONFIG.value, max_runs=_MAX_RUNS.value))


if __name__ == "__main__":
  app.run(main)
