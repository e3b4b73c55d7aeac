"""Run checkpoints: the train state, the data iterator and the RL loop state, saved together.

One Orbax ``CheckpointManager`` step holds three items:

  state  the ``TrainState`` pytree (params, optimizer state, reference params, counters);
  data   the grain iterator's ``get_state()`` (JSON), so a resumed run sees the same prompts;
  loop   JSON the trainer needs to continue exactly (step, seed, reward history, base scores).

Saves are asynchronous (training continues while the arrays are written) and atomic: Orbax writes
into a temporary folder and renames it when complete, so a run killed mid-save restores the
previous complete step. ``restore`` takes an abstract state (``ShapeDtypeStruct`` leaves with the
*target* shardings), which is how a checkpoint written on 8 devices restores onto 1, or onto
another mesh.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class RunCheckpointer:
  """Keep-N, async checkpoints of a training run under ``directory``.

  Args:
    directory: folder for the checkpoints (created; made absolute).
    keep: number of most recent steps kept on disk.
    async_save: write in a background thread.
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 2, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep_checkpoints={keep} must be >= 1")
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    """The newest complete step on disk, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict[str, Any], loop: dict[str, Any]) -> None:
    """Starts saving ``step`` (returns once the arrays are copied off the device)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        loop=ocp.args.JsonSave(loop)), force=True)

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Reads ``step`` (default: the latest) into the structure/shardings of ``abstract_state``.

    Returns:
      (state, data_state, loop).

    Raises:
      ValueError: no checkpoint, or one whose arrays do not match ``abstract_state`` (a different
        model or optimizer), naming the directory.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint under {self.directory}")
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
          loop=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
      raise ValueError(f"checkpoint {self.directory} step {step} does not match this run's "
                       f"model/optimizer ({e}); use another workdir") from e
    return out.state, out.data, out.loop

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, shardings: Any = None) -> Any:
  """``ShapeDtypeStruct`` leaves of ``tree`` with ``shardings`` (a matching pytree), or the leaves'
  own shardings when None: the target a restore lays the arrays out on."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
