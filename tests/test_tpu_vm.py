"""launch/tpu_vm.sh on a multi-host slice (v5p-16: two workers), in DRY_RUN mode: the exact gcloud
command lines of create / install / train / logs / stop / ssh / delete; then the remote commands
themselves, run here as a fake worker would (a stub trainer): train detaches and writes a per-worker
log and pid, a second train is refused, logs tails the log, stop SIGTERMs the trainer and waits."""

import os
import shlex
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "tpu_vm.sh")
GCLOUD_SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1"]
WHERE = ["--zone=us-central2-b", "--project=my-proj"]
WID = (
    "w=$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/"
    "instance/attributes/agent-worker-number || hostname)"
)


def dry_run(*args, **env):
  full = {
      **os.environ,
      "DRY_RUN": "1",
      "ZONE": "us-central2-b",
      "ACCELERATOR": "v5p-16",
      "PROJECT": "my-proj",
      "TMPDIR": "/tmp/x",
      **env,
  }
  for k in ("RUNTIME", "CONFIG", "REMOTE_DIR", "VENV", "LOG_DIR", "CACHE_DIR", "WORKER", "SPOT", "STOP_WAIT", "PYTHON"):
    if k not in env:
      full.pop(k, None)
  out = subprocess.run(["bash", SCRIPT, *args], env=full, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  return [shlex.split(line) for line in out.stdout.splitlines()]


def test_create_multi_host_slice():
  assert dry_run("create", "t1") == [
      [
          "gcloud",
          "compute",
          "tpus",
          "tpu-vm",
          "create",
          "t1",
          "--accelerator-type=v5p-16",
          "--version=v2-alpha-tpuv5",
          "--zone=us-central2-b",
          "--project=my-proj",
      ]
  ]
  assert dry_run("create", "t1", ACCELERATOR="v4-32", SPOT="1") == [
      [
          "gcloud",
          "compute",
          "tpus",
          "tpu-vm",
          "create",
          "t1",
          "--accelerator-type=v4-32",
          "--version=tpu-ubuntu2204-base",
          "--spot",
          "--zone=us-central2-b",
          "--project=my-proj",
      ]
  ]


def test_install_ships_the_checkout_and_builds_a_py311_venv_on_every_worker():
  tar, scp, ssh = dry_run("install", "t1")
  assert tar == [
      "tar",
      "-C",
      REPO,
      "--exclude=./.venv",
      "--exclude=./.git",
      "--exclude=./runs",
      "--exclude=__pycache__",
      "--exclude=*.egg-info",
      "-czf",
      "/tmp/x/htgrpo_jax-t1.tar.gz",
      ".",
  ]
  assert scp == [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "scp",
      "/tmp/x/htgrpo_jax-t1.tar.gz",
      "t1:htgrpo_jax.tar.gz",
      "--worker=all",
      *WHERE,
  ]
  remote = (
      "set -e; mkdir -p ~/htgrpo_jax && tar -xzf htgrpo_jax.tar.gz -C ~/htgrpo_jax; "
      "python3 -m pip install -q --user uv || python3 -m pip install -q --user --break-system-packages uv; "
      "[ -x ~/htgrpo_venv/bin/python ] || python3 -m uv venv --python 3.11 ~/htgrpo_venv; "
      "cd ~/htgrpo_jax && python3 -m uv pip install -q --python ~/htgrpo_venv/bin/python -e '.[tpu,train]'; "
      "~/htgrpo_venv/bin/python -c 'import sys, jax, htgrpo_jax; print(sys.version.split()[0], jax.__version__)'"
  )
  assert ssh == [*GCLOUD_SSH, "--worker=all", *WHERE, f"--command={remote}"]
  # Nothing on a worker may fall back to the image's system Python for the package itself.
  assert "python3 -m pip install -q --user uv" in remote and "-e '.[tpu,train]'" in remote
  assert "pip install -e" not in remote.replace("uv pip install", "")


def _train_remote(flags):
  return (
      f"{WID}; mkdir -p ~/htgrpo_logs && cd ~/htgrpo_jax || exit 1; "
      "pid=$(cat ~/htgrpo_logs/worker-$w.pid 2>/dev/null) && kill -0 $pid 2>/dev/null && "
      '{ echo "worker $w: already training (pid $pid); launch/tpu_vm.sh stop first"; exit 1; }; '
      f'echo "=== $(date -u +%FT%TZ) worker $w: launch/train.py {flags}" >> ~/htgrpo_logs/worker-$w.log; '
      f"setsid nohup ~/htgrpo_venv/bin/python launch/train.py {flags} >> ~/htgrpo_logs/worker-$w.log "
      "2>&1 < /dev/null & pid=$!; "
      "for i in $(seq 100); do [ \"$(ps -o sid= -p $pid | tr -d ' ')\" = $pid ] && break; sleep 0.1; done; "
      "echo $pid > ~/htgrpo_logs/worker-$w.pid; "
      'echo "worker $w: pid $pid, log ~/htgrpo_logs/worker-$w.log"'
  )


def test_train_runs_detached_on_all_workers_with_config_pass_through():
  [line] = dry_run(
      "train",
      "t1",
      "--config.rl.beta=0",
      "--config.world.reward_url=http://reward-host:8000/score",
      "--config.workdir=/mnt/a b",
  )
  flags = (
      "--config=configs/mmada_geneval.py --config.compilation_cache_dir=~/jax_cache "
      "--config.rl.beta=0 --config.world.reward_url=http://reward-host:8000/score "
      "--config.workdir=/mnt/a\\ b"
  )
  assert line == [*GCLOUD_SSH, "--worker=all", *WHERE, f"--command={_train_remote(flags)}"]
  # A --config in the flags replaces $CONFIG; CACHE_DIR="" drops the cache flag.
  [line] = dry_run("train", "t1", "--config=configs/lumina_dimoo_geneval.py", CACHE_DIR="")
  assert line[-1] == "--command=" + _train_remote("--config=configs/lumina_dimoo_geneval.py")


def test_logs_stop_ssh_delete():
  assert dry_run("logs", "t1") == [
      [*GCLOUD_SSH, "--worker=all", *WHERE, f"--command={WID}; tail -v -n 50 ~/htgrpo_logs/worker-$w.log"]
  ]
  assert dry_run("logs", "t1", "200", WORKER="1")[0][6:] == [
      "--worker=1",
      *WHERE,
      f"--command={WID}; tail -v -n 200 ~/htgrpo_logs/worker-$w.log",
  ]
  stop = (
      f"{WID}; pid=$(cat ~/htgrpo_logs/worker-$w.pid 2>/dev/null) && kill -0 $pid 2>/dev/null "
      '|| { echo "worker $w: not training"; exit 0; }; kill -TERM -- -$pid; '
      "for i in $(seq 300); do kill -0 $pid 2>/dev/null || break; sleep 1; done; "
      'if kill -0 $pid 2>/dev/null; then echo "worker $w: still running after 300s (pid $pid)"; exit 1; fi; '
      'echo "worker $w: stopped"'
  )
  assert dry_run("stop", "t1") == [[*GCLOUD_SSH, "--worker=all", *WHERE, f"--command={stop}"]]
  assert dry_run("ssh", "t1") == [[*GCLOUD_SSH, "--worker=0", *WHERE]]
  assert dry_run("ssh", "t1", "ls", "-la", WORKER="all") == [[*GCLOUD_SSH, "--worker=all", *WHERE, "--command=ls -la"]]
  assert dry_run("delete", "t1") == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "t1", "--quiet", *WHERE]]


@pytest.mark.parametrize(
    "args,err",
    [
        (["train"], "missing NAME"),
        (["stop"], "missing NAME"),
        (["logs"], "missing NAME"),
        (["logs", "t1", "ten"], "LINES must be a number"),
        (["bogus"], "launch/tpu_vm.sh create"),
        ([], "launch/tpu_vm.sh train"),
    ],
)
def test_bad_usage_exits_2(args, err):
  out = subprocess.run(
      ["bash", SCRIPT, *args], env=dict(os.environ, DRY_RUN="1"), capture_output=True, text=True, timeout=60
  )
  assert out.returncode == 2 and err in out.stderr, out.stderr


def test_unknown_accelerator_needs_runtime():
  out = subprocess.run(
      ["bash", SCRIPT, "create", "t1"],
      env=dict(os.environ, DRY_RUN="1", ACCELERATOR="tpu9-8"),
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert out.returncode == 2 and "set RUNTIME" in out.stderr


# ---- the remote commands, run on a fake worker ---------------------------------------------------


def _remote(cmd, tmp_path, *args):
  env = {
      "REMOTE_DIR": str(tmp_path / "code"),
      "VENV": str(tmp_path / "venv"),
      "LOG_DIR": str(tmp_path / "logs"),
      "CACHE_DIR": "",
      "STOP_WAIT": "20",
  }
  line = dry_run(cmd, "t1", *args, **env)[-1]
  assert line[-1].startswith("--command=")
  return line[-1][len("--command=") :]


def _on_worker(remote, tmp_path):
  """Runs a remote command as worker 3 of a slice: a curl that answers the metadata query."""
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir(exist_ok=True)
  (fake_bin / "curl").write_text("#!/bin/sh\necho 3\n")
  (fake_bin / "curl").chmod(0o755)
  env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}")
  return subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)


def test_remote_train_detaches_logs_per_worker_and_stop_sigterms_it(tmp_path):
  (tmp_path / "code" / "launch").mkdir(parents=True)
  (tmp_path / "venv" / "bin").mkdir(parents=True)
  stub = tmp_path / "venv" / "bin" / "python"  # the trainer: logs its argv, saves on SIGTERM
  stub.write_text(
      '#!/bin/bash\necho "argv: $* cwd: $PWD"\n'
      "trap 'echo \"SIGTERM: saved\"; exit 0' TERM\nwhile true; do sleep 0.1; done\n"
  )
  stub.chmod(0o755)
  t0 = time.time()
  out = _on_worker(_remote("train", tmp_path, "--config.rl.beta=0", "--config.workdir=/w x"), tmp_path)
  assert out.returncode == 0, out.stderr
  assert time.time() - t0 < 20  # returned while the trainer runs on
  log, pidfile = tmp_path / "logs" / "worker-3.log", tmp_path / "logs" / "worker-3.pid"
  assert f"worker 3: pid {pidfile.read_text().strip()}, log {log}" in out.stdout
  pid = int(pidfile.read_text())
  os.kill(pid, 0)  # alive
  assert os.getpgid(pid) == pid and os.getsid(pid) == pid  # its own session: ssh hangups miss it
  for _ in range(100):
    if "argv:" in log.read_text():
      break
    time.sleep(0.1)
  text = log.read_text()
  assert "worker 3: launch/train.py --config=configs/mmada_geneval.py --config.rl.beta=0" in text
  assert (
      f"argv: launch/train.py --config=configs/mmada_geneval.py --config.rl.beta=0 "
      f"--config.workdir=/w x cwd: {tmp_path / 'code'}"
  ) in text
  again = _on_worker(_remote("train", tmp_path), tmp_path)
  assert again.returncode == 1 and f"already training (pid {pid})" in again.stdout
  tail = _on_worker(_remote("logs", tmp_path, "5"), tmp_path)
  assert tail.returncode == 0 and f"==> {log} <==" in tail.stdout and "argv:" in tail.stdout
  stop = _on_worker(_remote("stop", tmp_path), tmp_path)
  assert stop.returncode == 0 and "worker 3: stopped" in stop.stdout, stop.stdout + stop.stderr
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)
  assert "SIGTERM: saved" in log.read_text()
  stop = _on_worker(_remote("stop", tmp_path), tmp_path)
  assert stop.returncode == 0 and "worker 3: not training" in stop.stdout


def test_remote_install_is_valid_shell(tmp_path):
  remote = _remote("install", tmp_path)
  out = subprocess.run(["bash", "-n", "-c", remote], capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
