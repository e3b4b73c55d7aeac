"""bench/train_step.py --quick runs end to end and prints the lines docs/performance.md quotes.

The bench AOT-compiles the step and calls the compiled program; it broke once when the step gained
its optional supervised argument (the compiled program wanted four arguments), which only a run of
the bench shows.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_bench_runs_and_reports_the_ratio(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="")  # one CPU device, as a user runs it
  out = subprocess.run(
      [sys.executable, str(ROOT / "bench" / "train_step.py"), "--quick", "--estimator=random_remask"],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  step_s = float(re.search(r"step_s \(median/\d+\)\s+([0-9.]+)", out.stdout).group(1))
  ratio = float(re.search(r"ratio step/matmul FLOP/s ([0-9.]+)", out.stdout).group(1))
  assert step_s > 0 and ratio > 0
  assert "skipped 0" in out.stdout  # the quick step's update is finite
