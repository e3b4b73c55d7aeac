"""What surrounds the training loop: the workdir lock and config history, SIGTERM / SIGINT and
preemption, time-based saves, the profile trace, and closing all of it on every exit path
(``RunControl``). ``trainer.train`` opens one per run; its names are re-exported by ``trainer``."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from htgrpo_jax import parallel, paths, writer
from htgrpo_jax import workdir as workdir_lib
from htgrpo_jax.checkpoint import RunCheckpointer, step_dirs


class Profiler:
  """A ``jax.profiler`` trace of RL steps ``[start, stop)`` into ``log_dir`` (process 0 only:
  its devices are the ones this host can trace; the others would race on the same folder).

  ``at(step)`` is called before step ``step`` runs; ``close()`` ends a trace still open (a run that
  stopped inside the window).
  """

  def __init__(self, window: tuple[int, int] | None, log_dir: str):
    self.window = window if parallel.is_primary() else None
    self.log_dir = log_dir
    self.active = False

  def at(self, step: int) -> None:
    if self.window is None:
      return
    start, stop = self.window
    if step == start and not self.active:
      jax.profiler.start_trace(self.log_dir)
      self.active = True
    elif step == stop:
      self.close()

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()


def exit_status(interrupted: str | None) -> int:
  """The exit status of a command that ran ``train``: 0 when the run ended by itself (finished,
  or ``stop_after``), else the shell's 128 + signal number of the signal that stopped it after
  saving: 143 for SIGTERM and for a preemption notice (a TPU VM's SIGTERM, seen through JAX's
  preemption service on a slice), 130 for SIGINT. A supervisor (a Kubernetes / JobSet restart
  policy, systemd's ``Restart=on-failure``, a shell loop ``until python launch/train.py ...``)
  then tells a run that is done from one that stopped early and must be started again to resume.
  """
  codes = {None: 0, "SIGTERM": 128 + signal.SIGTERM, "preemption": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}
  if interrupted not in codes:
    raise ValueError(f"interrupted={interrupted!r}: expected one of {sorted(map(str, codes))}")
  return int(codes[interrupted])


class TrainingInterrupted(KeyboardInterrupt):
  """A second SIGTERM/SIGINT (or one outside the training loop): stop now."""


class RunControl:
  """What surrounds the training loop, closed on every exit path.

  * the workdir lock (``workdir.WorkdirLock``) and the config comparison / history
    (``workdir.check_config``), both decided by process 0;
  * SIGTERM (TPU maintenance, spot preemption) and SIGINT: the first one lets the current step
    finish, saves it and stops the loop (``stop_signal``); a second one, or one before the loop,
    raises ``TrainingInterrupted`` at once. Installed only in a single-process run's main thread:
    in a multi-host run JAX's preemption service owns SIGTERM and ``reached_preemption`` (checked
    at every step) brings all processes to the same save;
  * ``save_every_minutes``: a time-based save, decided by process 0 for every process;
  * ``close``: restores the handlers, stops a profile trace, finishes the pending asynchronous
    save, closes the logs and releases the lock (``close_run``: the same but the handlers and the
    lock, at the end of a run that went well).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None]):
    self.log = log
    self.ckpt: RunCheckpointer | None = None
    self.runlog: writer.RunLog | None = None
    self.profiler: Profiler | None = None
    self.lock: workdir_lib.WorkdirLock | None = None
    self.stop_signal: str | None = None
    self.in_loop = False
    self.last_saved: int | None = None
    self.save_every_s = 60.0 * float(config.get("save_every_minutes", 0) or 0)
    self._last_save_t = time.monotonic()
    self._handlers: dict[int, Any] = {}
    try:

      def claim():
        paths.makedirs(workdir)
        # ``log``: a URL workdir's "NOT locked" note belongs in the run's log, not only absl's.
        self.lock = workdir_lib.WorkdirLock(workdir, log=log).acquire()
        workdir_lib.check_config(
            workdir,
            config.to_json_best_effort(),
            resuming=bool(step_dirs(paths.join(workdir, "checkpoints"))),
            allow=bool(config.get("allow_config_change", False)),
            log=log,
        )

      _on_primary(claim)
      if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
          self._handlers[sig] = signal.signal(sig, self._on_signal)
    except BaseException:
      self.close(failing=True)
      raise

  def _on_signal(self, signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if not self.in_loop or self.stop_signal is not None:
      raise TrainingInterrupted(
          f"{name}: stopping now" + (" (second signal)" if self.stop_signal else " (nothing new to save yet)")
      )
    self.stop_signal = name
    self.log(f"{name}: finishing this step, saving it, then stopping (send {name} again to stop " "at once)")

  def should_stop(self, step: int) -> bool:
    if self.stop_signal is None and self.ckpt is not None and self.ckpt.reached_preemption(step):
      self.stop_signal = "preemption"
    return self.stop_signal is not None

  def save_due(self) -> bool:
    if not self.save_every_s:
      return False
    due = time.monotonic() - self._last_save_t >= self.save_every_s
    if jax.process_count() > 1:  # clocks differ: every process must make the same call
      from jax.experimental import multihost_utils

      due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
    return due

  def saved(self, step: int) -> None:
    self.last_saved, self._last_save_t = step, time.monotonic()

  def close_run(self) -> list[Exception]:
    """Stops the profile trace, waits for the pending save, closes the logs (idempotent).

    Returns:
      the errors raised on the way (each part is closed whatever the others did).
    """
    errors = []
    for name in ("profiler", "ckpt", "runlog"):
      obj = getattr(self, name)
      setattr(self, name, None)
      if obj is not None:
        try:
          obj.close()  # the checkpointer waits for the pending save here
        except Exception as e:  # noqa: BLE001
          errors.append(e)
    return errors

  def close(self, failing: bool = False) -> None:
    """Idempotent. ``failing``: an exception is propagating, so errors here are logged, not raised
    over it."""
    for sig, handler in self._handlers.items():  # first: a signal during the wait below stops it
      signal.signal(sig, handler)
    self._handlers = {}
    errors = self.close_run()
    if self.lock is not None:
      self.lock.release()
      self.lock = None
    if errors and failing:
      self.log(f"WARNING: while stopping after an error, closing the run failed too: {errors}")
    elif errors:
      raise errors[0]


def _on_primary(fn: Callable[[], None]) -> None:
  """Runs ``fn`` on process 0; every process raises if it failed (so none goes on alone)."""
  err = None
  if jax.process_index() == 0:
    try:
      fn()
    except Exception as e:  # noqa: BLE001
      err = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    ok = int(multihost_utils.broadcast_one_to_all(np.int32(err is None)))
    if not ok and err is None:
      raise RuntimeError("process 0 refused to start this run (workdir lock or config check); " "see its log")
  if err is not None:
    raise err
