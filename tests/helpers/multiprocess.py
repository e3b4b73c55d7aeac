"""Runs one Python command as several JAX processes on this machine: the real multi-host code path
(``jax.distributed`` with a localhost coordinator), each process with its own fake CPU devices."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(argv: list[str], num_processes: int, devices_per_process: int, cwd: str | None = None,
          extra_env: dict[str, str] | None = None) -> list[subprocess.Popen]:
  """Starts ``python argv...`` once per process with the coordinator environment set."""
  port = free_port()
  procs = []
  for i in range(num_processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(extra_env or {}))
    procs.append(subprocess.Popen([sys.executable, *argv], cwd=cwd or REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def run(argv: list[str], num_processes: int, devices_per_process: int, timeout: float = 600,
        **kw) -> list[tuple[int, str]]:
  """(exit code, output) of every process; kills them all on a timeout."""
  procs = start(argv, num_processes, devices_per_process, **kw)
  out = []
  try:
    for p in procs:
      text, _ = p.communicate(timeout=timeout)
      out.append((p.returncode, text))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return out
