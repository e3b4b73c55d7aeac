"""A run directory's guards: one run at a time, and a resumed run means the same run.

``WorkdirLock``  an exclusive ``flock`` on ``<workdir>/.lock`` holding the owner's host, pid and
                 start time. The kernel drops the lock when its process dies (even by SIGKILL), so
                 a lock left by a dead run never blocks; a second live run is refused, naming the
                 holder. (On a file system without ``flock`` the recorded pid is checked instead.)
                 A URL workdir (``gs://bucket/run``) cannot be locked at all: an object store has
                 no ``flock`` and no atomic create-if-absent through ``etils.epath``, so the lock is
                 skipped with a warning saying so, and keeping one run per bucket folder is left
                 to the user.
``check_config`` compares a resumed run's config with the one its checkpoints were written under
                 (``config.json``): a change to what the run means (seed, optimizer, algorithm,
                 data, model, ...) is refused unless ``allow_config_change=True``; bookkeeping keys
                 (``HARMLESS_KEYS``) and a larger ``total_steps`` (on a constant learning rate)
                 pass. Every start appends its config and changes to ``config_history.jsonl``;
                 ``config.json`` is the current one.

Both take local paths or URLs (``htgrpo_jax.paths``).

On a multi-host slice the trainer runs both on process 0 only (``trainer.RunControl``): process 0
alone writes the run's files (Orbax's checkpoint shards aside, which need a folder every host
shares, in practice a bucket), so its lock is the one that guards them, and the other hosts'
local disks hold nothing of the run to guard. When process 0 is refused, every process raises
(tests/test_multihost.py) rather than waiting for it at the next collective. A second slice
started on the same workdir from other machines is only caught when that workdir is one local
file system they share (NFS with ``flock``); on a bucket nothing can catch it (above).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Any, Callable

from absl import logging

from htgrpo_jax import paths

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"

# Keys a resumed run may change freely: cadence, bookkeeping, where things live, not what is
# trained. A trailing '.' matches a whole sub-config.
HARMLESS_KEYS = (
    "progress",
    "log_every",
    "eval_every",
    "save_every",
    "save_every_minutes",
    "keep_checkpoints",
    "max_consecutive_skips",
    "allow_config_change",
    "workdir",
    "mesh.",
    "eval.grid_size",
    "eval.batch_size",
    "eval.at_start",
    "world.data_dir",
    "model.checkpoint",
    "model.pretrain_if_missing",
    "model.pretrain_config",
    "model.pretrain.",
    "world.reward_url",
    "world.score_url",
    "world.reward_timeout",
    "world.reward_retries",
    "world.reward_backoff_s",
    "profile_steps",
    "compilation_cache_dir",
    "log_level",  # what is traced, cached and logged
    "rollout.max_in_flight",  # how many rollout parts are scored at once: the same rewards
)


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


class ConfigChangedError(ValueError):
  """A resumed run's config changes what the run means."""


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """Exclusive lock of a run directory; ``acquire()`` raises ``WorkdirLockedError`` naming the
  holder's host and pid. Use as a context manager or call ``release()``.

  A URL workdir (``gs://...``) is kept as it is and not locked: ``acquire`` says so through
  ``log`` (default: an absl warning) and ``locked`` stays False.
  """

  def __init__(self, workdir: str, *, log: Callable[[str], None] | None = None):
    self.workdir = paths.resolve(workdir)
    self.path = paths.join(self.workdir, LOCK_FILE)
    self._fd: int | None = None
    self._log = log or (lambda msg: logging.warning("%s", msg))

  @property
  def locked(self) -> bool:
    """True while this object holds the lock."""
    return self._fd is not None

  def _holder(self, fd: int) -> dict[str, Any]:
    try:
      return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
      return {}

  def _refuse(self, holder: dict[str, Any], why: str = "") -> WorkdirLockedError:
    return WorkdirLockedError(
        f"workdir {self.workdir} is in use by another run: host {holder.get('host', '?')}, pid "
        f"{holder.get('pid', '?')}, started {holder.get('started', '?')} (lock {self.path}{why}). "
        "Stop that run, or use another workdir."
    )

  def acquire(self) -> "WorkdirLock":
    if paths.is_url(self.workdir):
      paths.makedirs(self.workdir, exist_ok=True)
      self._log(
          f"workdir {self.workdir} is not on a local file system: it is NOT locked (an object "
          "store has no flock), so nothing stops a second run from writing into it; make sure "
          "only one run uses this workdir"
      )
      return self
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._holder(fd)
      os.close(fd)
      raise self._refuse(holder) from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        os.close(fd)
        raise
      # No flock here (some network file systems): trust the recorded pid on this host.
      holder = self._holder(fd)
      if holder.get("pid") and holder.get("pid") != os.getpid():
        if holder.get("host") != socket.gethostname():
          os.close(fd)
          raise self._refuse(
              holder,
              "; this file system cannot lock, so a holder on another host "
              "cannot be checked: delete the lock file if that run is gone",
          ) from None
        if _pid_alive(int(holder["pid"])):
          os.close(fd)
          raise self._refuse(holder) from None
    me = json.dumps(dict(host=socket.gethostname(), pid=os.getpid(), started=_now())).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, me, 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    # Emptied, not unlinked: a run that opened the file meanwhile must lock this same inode.
    try:
      os.ftruncate(self._fd, 0)
    except OSError:
      pass
    try:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    except OSError:
      pass
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# ------------------------------------------------------------------------------------------------
# Config comparison and history


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Nested dicts -> {'a.b.c': leaf}; an empty dict is a leaf."""
  if isinstance(tree, dict) and tree:
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _harmless(key: str) -> bool:
  return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS_KEYS)


def compare_configs(
    saved: dict[str, Any], current: dict[str, Any]
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
  """(refused, allowed): ``{key: (saved value, current value)}`` of the keys that differ.

  Keys present on one side only (a code update added or removed a setting) are allowed: they
  are not a change the user made to this run.
  """
  a, b = flatten(saved), flatten(current)
  decays = a.get("optim.decay", "constant") != "constant"
  refused, allowed = {}, {}
  for key in sorted(set(a) | set(b)):
    old, new = a.get(key, "<absent>"), b.get(key, "<absent>")
    if old == new and type(old) is type(new):
      continue
    if key not in a or key not in b or _harmless(key):
      allowed[key] = (old, new)
    elif key == "total_steps" and isinstance(old, int) and isinstance(new, int) and new > old and not decays:
      # Longer is fine on a constant learning rate: a longer run passes through the shorter one's
      # states. A decaying schedule is written for its total_steps, so extending it is a new run.
      allowed[key] = (old, new)
    elif (
        isinstance(old, (int, float))
        and isinstance(new, (int, float))
        and old == new
        and not isinstance(old, bool)
        and not isinstance(new, bool)
    ):
      continue  # 1 vs 1.0 from a command line: the same setting
    else:
      refused[key] = (old, new)
  return refused, allowed


def check_config(
    workdir: str, config_json: str, *, resuming: bool, allow: bool, log: Callable[[str], None] = print
) -> dict[str, tuple[Any, Any]]:
  """Compares ``config_json`` with ``<workdir>/config.json`` when ``resuming``, then records it.

  Args:
    workdir: the run directory (locked by the caller).
    config_json: the current config as JSON (``ConfigDict.to_json_best_effort()``).
    resuming: the workdir holds checkpoints (a run without any starts afresh: nothing to keep).
    allow: ``allow_config_change``: proceed despite refused changes (loudly, and recorded).
    log: where the notes go.

  Returns:
    Every changed key: ``{key: (saved, current)}``.

  Raises:
    ConfigChangedError: naming each refused key with both values.
  """
  path = paths.join(workdir, CONFIG_FILE)
  current = json.loads(config_json)
  changes: dict[str, tuple[Any, Any]] = {}
  if resuming and paths.exists(path):
    try:
      with paths.open(path, encoding="utf-8") as f:
        saved = json.load(f)
    except (OSError, ValueError) as e:
      log(f"WARNING: {path} is unreadable ({e}); the resumed config is not compared with it")
      saved = None
    if saved is not None:
      refused, allowed = compare_configs(saved, current)
      changes = {**refused, **allowed}
      fmt = lambda d: ", ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in d.items())
      if refused and not allow:
        hint = ""
        if "total_steps" in refused:
          hint = " (total_steps may only grow, and only on optim.decay='constant')"
        raise ConfigChangedError(
            f"resuming {workdir} with a different config: {fmt(refused)}{hint}. These settings "
            f"change what the run means; its checkpoints were written under {path}. Restore them, "
            "use another workdir, or pass --config.allow_config_change=True to continue anyway "
            f"(recorded in {HISTORY_FILE})."
        )
      if refused:
        log(
            f"WARNING: allow_config_change=True: resuming with changed settings {fmt(refused)}; "
            f"the run no longer means what its first start did (see {HISTORY_FILE})"
        )
      if allowed:
        log(f"Resuming with changed settings: {fmt(allowed)}")
  n = 0
  hist = paths.join(workdir, HISTORY_FILE)
  if paths.exists(hist):
    with paths.open(hist, encoding="utf-8") as f:
      n = sum(1 for line in f if line.strip())
  paths.append_text(
      hist,
      json.dumps(
          dict(
              start=n,
              time=_now(),
              host=socket.gethostname(),
              pid=os.getpid(),
              resuming=resuming,
              changed={k: list(v) for k, v in changes.items()},
              config=current,
          )
      )
      + "\n",
  )
  # Atomic: a kill mid-write never leaves a truncated config.json.
  paths.write_text_atomic(path, json.dumps(current, indent=2))
  return changes
