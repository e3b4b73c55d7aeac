"""Runs (or resumes) an efficacy study: RL arms x seeds from one frozen base, equal rollout budgets.

  python launch/study.py --config=configs/study.py [--config.key=value ...] [--max_runs=N]

Writes the study's Markdown table with 95 % intervals and its PNG curves (configs/study.py says
where) after every finished run; a stopped study resumes where it was.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/study.py", "Study config: path.py[:tiny].", lock_config=True)
_MAX_RUNS = flags.DEFINE_integer("max_runs", None, "Stop after this many runs (resumable).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from htgrpo_jax import study
  print(study.run_study(_CONFIG.value, max_runs=_MAX_RUNS.value))


if __name__ == "__main__":
  app.run(main)
