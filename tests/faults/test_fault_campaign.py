"""Long fault campaigns (``-m slow``): real processes killed with SIGKILL / SIGTERM at random
moments, inside saves and keep-N deletion, with reward and evaluation failures, then restarted;
and one deterministic SIGTERM of launch/train.py (it saves, exits 143, and the same command resumes
to the end and exits 0)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_randomised_fault_campaign(tmp_path):
  out = subprocess.run(
      [
          sys.executable,
          os.path.join(REPO, "bench", "fault_campaign.py"),
          "--trials=2",
          "--faults=3",
          "--total_steps=6",
          "--seed=7",
          f"--root={tmp_path}",
      ],
      capture_output=True,
      text=True,
      timeout=3000,
  )
  text = out.stdout + out.stderr[-3000:]
  assert out.returncode == 0, text
  assert "bit-identical    : 2/2 (yes)" in out.stdout, text
  assert "checkpoints lost : 0" in out.stdout and "NaN ever written : no" in out.stdout, text


@pytest.mark.slow
def test_sigterm_to_launch_train_saves_and_exits_143_then_resumes_and_exits_0(tmp_path):
  wd = tmp_path / "run"
  args = [
      sys.executable,
      os.path.join(REPO, "launch", "train.py"),
      "--config=" + os.path.join(REPO, "configs", "geneval.py") + ":htgrpo,tiny",
      f"--config.world.data_dir={tmp_path / 'world'}",
      f"--config.model.checkpoint={tmp_path / 'base'}",
      f"--config.workdir={wd}",
      "--config.progress=False",
      "--config.save_every=3",
      "--config.eval_every=100",
  ]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = wd / "metrics.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and metrics.read_text().strip():
      break
    time.sleep(0.1)
  assert proc.poll() is None, "the run finished before it could be signalled"
  proc.send_signal(signal.SIGTERM)
  text = proc.communicate(timeout=300)[0]
  assert proc.returncode == 143, text[-3000:]  # stopped early: a supervisor restarts it
  logged = max(json.loads(ln)["step"] for ln in metrics.read_text().splitlines() if ln.strip())
  saved = sorted(int(n) for n in os.listdir(wd / "checkpoints") if n.isdigit())
  assert saved and saved[-1] == logged and "SIGTERM" in text, (saved, logged, text[-2000:])
  out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  assert f"at step {logged}." in out.stdout + out.stderr
