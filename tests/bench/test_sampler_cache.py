"""bench/sampler.py --cache runs and prints what docs/performance.md ("Rollout cache") cites: both
medians, the speed ratio and the cache's schedule (which steps are full, how many positions the others run)."""

import re

import pytest

from tests.helpers.bench_args import run_bench


@pytest.mark.slow  # the bench runs; the cache's exactness is tests/sampling/test_rollout_cache.py
def test_sampler_cache_comparison_prints_medians_and_ratio(tmp_path):
  text = run_bench(
      "sampler.py",
      "--cache",
      "--grid=4",
      "--layers=1",
      "--batch=4",
      "--steps=6",
      "--sketch-steps=2",
      "--repeats=2",
      cwd=tmp_path,
      timeout=600,
  )
  # T=6, warmup int(6 * 0.3) = 1: steps 0, 1 (warmup), 2 (first paint step) full; 3-5 cached, 2 of 32.
  assert "3 of 6 steps full, the others recompute 4 of 32 positions" in text, text
  med = {m[0]: float(m[1]) for m in re.findall(r"sample (plain|cached) \(median\): ([\d.]+) s", text)}
  assert set(med) == {"plain", "cached"} and all(v > 0 for v in med.values()), text
  ratio = float(re.search(r"speed-up plain / cached = ([\d.]+)x", text).group(1))
  p, c, h = med["plain"], med["cached"], 0.0005  # the medians are printed to 3 decimals
  assert (p - h) / (c + h) - 0.005 <= ratio <= (p + h) / max(c - h, 1e-9) + 0.005, text
  same = float(re.search(r"tokens equal to the plain sampler's \(same key\): ([\d.]+)", text).group(1))
  assert 0.0 <= same <= 1.0
