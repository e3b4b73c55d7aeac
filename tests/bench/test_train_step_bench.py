"""bench/train_step.py --quick runs end to end and prints the lines docs/performance.md quotes.

The bench AOT-compiles the step and calls the compiled program; it broke once when the step gained
its optional supervised argument (the compiled program wanted four arguments), which only a run of
the bench shows.
"""

import re

from tests.helpers.bench_args import run_bench


def test_quick_bench_runs_and_reports_the_ratio(tmp_path):
  out = run_bench("train_step.py", "--quick", "--estimator=random_remask", cwd=tmp_path)
  step_s = float(re.search(r"step_s \(median/\d+\)\s+([0-9.]+)", out).group(1))
  ratio = float(re.search(r"ratio step/matmul FLOP/s ([0-9.]+)", out).group(1))
  assert step_s > 0 and ratio > 0
  assert "skipped 0" in out  # the quick step's update is finite
