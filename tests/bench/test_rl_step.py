"""bench/rl_step.py runs and its tables add up: what the README's RL-step row and docs/performance.md cite.

The FLOPs table must give each 8B config's sampler and update shares summing to 100 %, with the sampler's
share growing with its step count (Lumina-DiMOO's T 64 vs MMaDA's T 15 at the same B and K). The timed run
(slow) must report every phase of the tiny config's step with shares summing to 100 %.
"""

import re

import pytest

from tests.helpers.bench_args import run_bench


def _run(*args: str, tmp_path) -> str:
  return run_bench("rl_step.py", *args, cwd=tmp_path)


def _rows(text: str, first: str) -> list[list[str]]:
  return [
      [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith(f"| {first}")
  ]


def test_flops_table_shares(tmp_path):
  out = _run("--flops_only", tmp_path=tmp_path)
  shares = {}
  for row in _rows(out, "mmada") + _rows(out, "lumina"):
    samp, upd = float(row[-2].rstrip("%")), float(row[-1].rstrip("%"))
    assert samp + upd == pytest.approx(100.0, abs=0.11)
    assert float(row[6].replace(",", "")) > 0 and float(row[7].replace(",", "")) > 0
    shares[row[1]] = (int(row[3]), samp)
  assert set(shares) == {"mmada_8b", "lumina_dimoo_8b"}
  assert shares["lumina_dimoo_8b"][0] > shares["mmada_8b"][0]
  assert shares["lumina_dimoo_8b"][1] > shares["mmada_8b"][1]


@pytest.mark.slow
def test_quick_run_reports_every_phase(tmp_path):
  out = _run("--quick", f"--workdir={tmp_path}", tmp_path=tmp_path)
  assert "B 16 images" in out
  total = 0.0
  for phase in ("data", "h2d", "sampling", "decoding", "d2h", "rewards", "update"):
    (row,) = _rows(out, f"{phase} |")
    assert float(row[1]) > 0
    total += float(row[2].rstrip("%"))
  assert total == pytest.approx(100.0, abs=0.5)
  assert re.search(r"first step \(compiles every program\) [0-9.]+ s", out)
