"""Runs one Python command as several JAX processes on this machine: the real multi-host code path
(``jax.distributed`` with a localhost coordinator), each process with its own fake CPU devices."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# How JAX processes are told about one another here; never inherited from the test's own process.
COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_PORT")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(
    argv: list[str],
    num_processes: int,
    devices_per_process: int,
    cwd: str | None = None,
    extra_env: dict[str, str] | None = None,
    coordinator_env: bool = True,
    env_of: Callable[[int], dict[str, str]] | None = None,
    argv_of: Callable[[int, int], list[str]] | None = None,
) -> list[subprocess.Popen]:
  """Starts ``python argv...`` once per process with the coordinator environment set (without it
  when ``coordinator_env`` is False: the processes must find one another some other way);
  ``env_of(i)`` adds process i's own variables, ``argv_of(i, port)`` its own arguments (``port``:
  a free one for the coordinator)."""
  port = free_port()
  procs = []
  for i in range(num_processes):
    env = {k: v for k, v in os.environ.items() if k not in COORDINATOR_ENV}
    if coordinator_env:
      env.update(
          JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i)
      )
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **(extra_env or {}),
        **(env_of(i) if env_of else {}),
    )
    mine = argv_of(i, port) if argv_of else []
    procs.append(
        subprocess.Popen(
            [sys.executable, *argv, *mine],
            cwd=cwd or REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    )
  return procs


def run(
    argv: list[str], num_processes: int, devices_per_process: int, timeout: float = 600, **kw
) -> list[tuple[int, str]]:
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
