"""What the bench tests share: the tiny size they run ``bench/train_step.py``'s builders at, and a
runner for a bench script as a user runs it."""

import os
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, cwd: Path, timeout: int = 900) -> str:
  """Runs ``bench/<script>`` in a fresh process on one CPU device (no fake devices, as a user runs
  it) from ``cwd``; asserts it exits 0 (showing its stderr's end if not) and returns its stdout."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="")
  out = subprocess.run(
      [sys.executable, str(ROOT / "bench" / script), *args],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def tiny_bench_args(**over) -> types.SimpleNamespace:
  """``bench/train_step.py``'s command-line namespace at a size a test compiles in seconds."""
  args = dict(
      d=32,
      layers=1,
      heads=2,
      mlp=64,
      tokens=16,
      codebook=16,
      prompt_len=4,
      batch=8,
      group=4,
      sampler_steps=4,
      stages=(1, 1, 1),
      micro_batch_size=0,
  )
  return types.SimpleNamespace(**{**args, **over})
