"""Process setup every entry point runs before it builds anything: the multi-process runtime, JAX's
persistent compilation cache and the log level.

``setup_runtime(config)`` reads three optional config keys (a config without them gets the
defaults):

``compilation_cache_dir`` ("": off)  JAX's persistent compilation cache. A relaunched run (a spot
    VM's restart, a resumed run, the next arm of a study) loads its compiled sampler and train step
    from here instead of compiling them again (minutes for the 8B programs). A local folder is
    created; a ``gs://`` path is used as is (JAX then needs ``etils``). On a pod slice point every
    worker at the same bucket path, or at a local folder of its own. The cache is trusted code:
    never share it with anyone who may write to it. JAX's own thresholds apply (an entry is written
    when its compile took >= ``jax_persistent_cache_min_compile_time_secs``, default 1 s; the
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` environment variable changes it).
``log_level`` ("info")  absl logging verbosity of process 0: debug, info, warning, error or fatal.
    Every other process logs at warning (or at ``log_level`` when that is stricter), so a 64-host
    slice does not print each line 64 times. At 'info' the libraries' own info chatter (Orbax
    prints ~40 lines per checkpoint save; TFDS, grain and JAX's internals more) is dropped so the
    run's lines and progress bar stay readable; 'debug' shows everything.
``profile_steps`` ("")  not read here: the trainer traces those RL steps with ``jax.profiler``.

Which processes form the job is not in the config (it differs between the hosts of one run):
JAX's own cluster detection finds a Cloud TPU slice (through the TPU metadata server), GKE, SLURM
and Open MPI; any other cluster passes ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (``define_distributed_flags``) or the ``JAX_COORDINATOR_ADDRESS`` /
``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` environment variables.

The multi-process runtime is initialised first (``parallel.initialize_distributed``, idempotent),
because asking JAX for the process index starts its backend, after which a slice's processes could
no longer join one another.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

LOG_LEVELS = ("debug", "info", "warning", "error", "fatal")
DEFAULT_LOG_LEVEL = "info"
# Source folders whose INFO records are dropped at log_level='info' (warnings always pass).
CHATTY_PACKAGES = ("orbax", "tensorflow_datasets", "grain", "jax", "jaxlib", "absl")


class _ChattyInfoFilter:
  """Drops records below WARNING emitted from a file under one of ``CHATTY_PACKAGES``."""

  def __init__(self):
    seps = (os.sep, "/")
    self._marks = tuple(f"{sep}{pkg}{sep}" for pkg in CHATTY_PACKAGES for sep in set(seps))

  def filter(self, record) -> bool:
    import logging as std_logging

    if record.levelno >= std_logging.WARNING:
      return True
    return not any(mark in (record.pathname or "") for mark in self._marks)


_FILTER = _ChattyInfoFilter()


@dataclasses.dataclass(frozen=True)
class Runtime:
  """What ``setup_runtime`` did."""

  process_index: int
  process_count: int
  log_level: str  # the level this process logs at
  compilation_cache_dir: str  # "" when the cache is off


def _get(config: Any, key: str, default):
  if config is None:
    return default
  value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
  return default if value is None else value


def log_level_for(level: str, process_index: int) -> str:
  """The absl level a process logs at: ``level`` on process 0, at least 'warning' elsewhere.

  Raises:
    ValueError: ``level`` is not one of ``LOG_LEVELS`` (naming the key).
  """
  if not isinstance(level, str) or level.strip().lower() not in LOG_LEVELS:
    raise ValueError(f"log_level={level!r}: must be one of {', '.join(LOG_LEVELS)}")
  level = level.strip().lower()
  if process_index == 0:
    return level
  return max(level, "warning", key=LOG_LEVELS.index)


def set_compilation_cache(path: str) -> str:
  """Points JAX's persistent compilation cache at ``path`` ("" turns it off); returns the path used.

  Call it before the programs it should cover are compiled. JAX opens the cache once, at the
  first compile after a directory is set, and keeps it: a second call with another directory
  (a notebook rerun, the next run of a study in one process) would go on writing to the first,
  so the cache state is reset first (JAX's public ``compilation_cache.reset_cache``).
  """
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc

  if not isinstance(path, str):
    raise ValueError(f"compilation_cache_dir={path!r}: must be a path string ('' = off)")
  if path and "://" not in path:
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
  cc.reset_cache()
  if path:
    cc.set_cache_dir(path)
  else:
    jax.config.update("jax_compilation_cache_dir", None)
  return path


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def reuse_host_memory() -> bool:
  """Keeps the host memory a call frees for the next call (glibc's malloc), so XLA:CPU's per-call
  buffers are not faulted in afresh on every call.

  XLA:CPU allocates an executable's temp buffer (every intermediate of one call: 461 MB for the
  shapes-size fwd+bwd) with malloc on each call; glibc serves requests over 32 MB with a fresh
  ``mmap`` and unmaps them when freed, so each call page-faults the whole buffer in again and the
  kernel zeroes it: 113k page faults and ~0.25 s of system time per shapes-size RL update, 3-5 % of
  it on one thread (docs/performance.md, "Outside the forward + backward"). This sets glibc's malloc
  to one arena, no ``mmap`` and no trimming below 2 GiB of free heap top, so freed buffers stay in
  the heap and the next call reuses them: the same update then runs with no page faults.

  Process-wide and one-way: the heap does not shrink (the resident size stays at its peak) and all
  threads share one malloc arena. Call it before JAX starts its backend (worker threads keep the
  arena they first allocated from). It changes no result, only where memory comes from.

  Returns:
    True when applied; False (nothing changed) where the C library has no glibc ``mallopt``.
  """
  import ctypes

  try:
    libc = ctypes.CDLL(None)
    mallopt, _ = libc.mallopt, libc.gnu_get_libc_version
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return bool(mallopt(_M_ARENA_MAX, 1) & mallopt(_M_MMAP_MAX, 0) & mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def cpu_model() -> str:
  """The host CPU's model name ('AMD EPYC', 'Intel(R) Xeon(R) ...'; '' when the OS does not say)."""
  import platform

  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def machine() -> dict[str, str]:
  """What this process computes on, for provenance records (a base's ``pretrain.json``, a run's
  ``wall.json``): ``device`` ('cpu x1 (AMD EPYC)', 'NVIDIA H200 x1'), ``jax`` and ``jaxlib``.

  The CPU's model is part of ``device`` on the CPU backend because a base pretrained with the same
  recipe, seed and software on another CPU kind came out with other params (likely cause: XLA:CPU
  compiles for the host's vector units and sums in another order; docs/findings.md, section 19).
  Starts JAX's backend.
  """
  import jax
  import jaxlib

  dev = f"{jax.devices()[0].device_kind} x{jax.device_count()}"
  if jax.default_backend() == "cpu" and (cpu := cpu_model()):
    dev += f" ({cpu})"
  return dict(device=dev, jax=jax.__version__, jaxlib=jaxlib.__version__)


@dataclasses.dataclass(frozen=True)
class DistributedFlags:
  """The command-line flags of an explicit multi-process setup (``define_distributed_flags``)."""

  coordinator_address: Any
  num_processes: Any
  process_id: Any

  def values(self) -> dict[str, Any]:
    """``setup_runtime``'s keyword arguments from the parsed flags."""
    return dict(
        coordinator_address=self.coordinator_address.value,
        num_processes=self.num_processes.value,
        process_id=self.process_id.value,
    )


def define_distributed_flags() -> DistributedFlags:
  """Defines ``--coordinator_address``, ``--num_processes`` and ``--process_id`` for a cluster
  JAX does not detect by itself (a Cloud TPU slice, GKE, SLURM and Open MPI need none of them).
  They are flags, not config keys, because they differ between the hosts of one run (the process
  id) and say nothing about the run itself; unset, the ``JAX_COORDINATOR_ADDRESS`` /
  ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` environment variables, then JAX's cluster detection,
  decide."""
  from absl import flags

  return DistributedFlags(
      coordinator_address=flags.DEFINE_string(
          "coordinator_address",
          None,
          "host:port of process 0's JAX coordinator, on every process "
          "(env JAX_COORDINATOR_ADDRESS); unset on a Cloud TPU slice, GKE, SLURM, Open MPI.",
      ),
      num_processes=flags.DEFINE_integer(
          "num_processes", None, "Processes in the job (env " "JAX_NUM_PROCESSES).", lower_bound=1
      ),
      process_id=flags.DEFINE_integer(
          "process_id", None, "This process's index, 0 .. num_processes - 1 " "(env JAX_PROCESS_ID).", lower_bound=0
      ),
  )


def setup_runtime(
    config: Any = None,
    *,
    initialize_distributed: bool = True,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> Runtime:
  """Multi-process runtime, compilation cache and log level for this process, from ``config``.

  Args:
    config: a ``ConfigDict`` (or any mapping) with the optional keys ``compilation_cache_dir``
      and ``log_level``; None gives the defaults.
    initialize_distributed: start JAX's multi-process runtime first (auto-detected on a Cloud TPU
      slice; a no-op on one machine). Turn it off only where the caller already did.
    coordinator_address, num_processes, process_id: an explicit multi-process setup (the
      ``define_distributed_flags`` flags; None: the environment or JAX's cluster detection).

  Raises:
    ValueError: a bad ``log_level`` or ``compilation_cache_dir``, before anything is set.
  """
  level = _get(config, "log_level", DEFAULT_LOG_LEVEL)
  log_level_for(level, 0)  # validate before touching anything
  cache = _get(config, "compilation_cache_dir", "")
  if not isinstance(cache, str):
    raise ValueError(f"compilation_cache_dir={cache!r}: must be a path string ('' = off)")
  import jax
  from absl import logging

  if initialize_distributed:
    from htgrpo_jax import parallel

    parallel.initialize_distributed(
        "auto", coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  index = jax.process_index()  # starts the backend (not a compile: the cache can come after)
  mine = log_level_for(level, index)
  logging.set_verbosity(mine)
  handler = logging.get_absl_handler()
  handler.removeFilter(_FILTER)
  if mine == "info":
    handler.addFilter(_FILTER)
  cache = set_compilation_cache(cache)
  if cache:
    logging.info("persistent compilation cache: %s", cache)
  return Runtime(process_index=index, process_count=jax.process_count(), log_level=mine, compilation_cache_dir=cache)
