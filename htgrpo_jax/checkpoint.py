"""Run checkpoints: the train state, the data iterator and the RL loop state, saved together and
verified on restore.

One Orbax ``CheckpointManager`` step holds four items:

  state     the ``TrainState`` pytree (params, optimizer state, reference params, counters);
  data      the grain iterator's ``get_state()`` (JSON), so a resumed run sees the same prompts;
  loop      JSON the trainer needs to continue exactly (step, seed, reward history, base scores);
  manifest  what was written: every state leaf's path, shape, dtype and checksum, and the SHA-256
            of the two JSON items.

Saves are asynchronous (training continues while the arrays are written) and atomic: Orbax writes
into a temporary folder and renames it when complete, so a run killed mid-save restores the
previous complete step. Keep-N deletion is atomic too: an old step is first renamed into
``trash/`` (which no step listing sees) and only then removed, so a kill during the deletion
cannot leave a half-deleted step that looks complete.

``restore`` checks a step against its manifest: an unreadable array (truncated or missing file), a
garbled or edited JSON item and a flipped bit in array data all raise ``CorruptCheckpointError``
naming the step and the file or leaf; with ``step=None`` the newest *intact* step is used, every
newer corrupt one is reported through ``warn`` and moved into ``corrupt/`` (kept for inspection,
out of the way of the next save). A checkpoint whose leaves do not match the run (another model
or optimizer) raises ``CheckpointMismatchError`` instead and is left alone.

``restore`` takes an abstract state (``ShapeDtypeStruct`` leaves with the *target* shardings),
which is how a checkpoint written on 8 devices restores onto 1, or onto another mesh; the
checksums do not depend on the sharding.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from htgrpo_jax import paths

MANIFEST_VERSION = 1
_TRASH = "trash"  # keep-N deletions land here (atomic rename), then are removed
_CORRUPT = "corrupt"  # steps that failed verification, moved aside by a falling-back restore


class CorruptCheckpointError(ValueError):
  """A checkpoint step whose files cannot be read or do not hold what was written.

  Attributes:
    step: the step (None when the error summarises several steps).
    path: the file, item folder or step folder at fault.
  """

  def __init__(self, step: int | None, path: str, reason: str):
    self.step, self.path = step, path
    where = f"step {step} " if step is not None else ""
    super().__init__(f"corrupt checkpoint {where}at {path}: {reason}")


class CheckpointMismatchError(ValueError):
  """A checkpoint that is intact but was written by another model/optimizer."""


def _short(e: BaseException, n: int = 300) -> str:
  """One line of an exception (TensorStore errors embed a page of JSON spec)."""
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:n]}{'...' if len(text) > n else ''}"


def _read_error(e: BaseException) -> str:
  """A TensorStore read error in one line: its innermost cause, which names the leaf and the file
  (e.g. 'Error reading "params.w/0.0" in OCDBT database at local file ...'), not the page of
  TensorStore spec the outer exception carries."""
  root = e
  while (root.__cause__ or root.__context__) is not None:
    root = root.__cause__ or root.__context__
  return _short(root)


def _canonical_json(obj: Any) -> Any:
  """``obj`` as JSON would give it back (tuples -> lists, numpy scalars -> numbers): a private
  copy for the async writer, and the form the hash is taken of."""
  return json.loads(json.dumps(obj, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def json_sha256(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Checksums, computed on device (one fused read per leaf; nothing is gathered to a host)
# ------------------------------------------------------------------------------------------------


def _words(x: jax.Array) -> jax.Array:
  """The raw bits of ``x`` as uint32 (8-byte dtypes gain a trailing axis of 2)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """uint32[2]: the sum of the words and the sum of word * odd-hash(flat index), both mod 2^32.

  Integer sums wrap and are associative, so the result is the same however the leaf is sharded
  and reduced; one flipped bit changes the first sum, moved or swapped words the second.
  """
  w = _words(x)
  idx = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(w.ndim)):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
    stride *= w.shape[d]
  mix = (idx * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)) | jnp.uint32(1)
  return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * mix, dtype=jnp.uint32)])


_checksums_jit = jax.jit(lambda leaves: [_leaf_checksum(x) for x in leaves])


def leaf_checksums(tree: Any) -> dict[str, list[int]]:
  """``{keystr(path): [sum, mixed sum]}`` of every array leaf of ``tree``."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = _checksums_jit([jnp.asarray(x) for _, x in flat])
  # Replicated scalars: every process reads its own copy (works on multi-host arrays too).
  return {jax.tree_util.keystr(p): [int(v) for v in np.asarray(s.addressable_data(0))] for (p, _), s in zip(flat, sums)}


def _leaf_specs(tree: Any) -> dict[str, tuple[list[int], str]]:
  return {
      jax.tree_util.keystr(p): (list(x.shape), str(np.dtype(x.dtype)))
      for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


# ------------------------------------------------------------------------------------------------


def _default_warn(msg: str) -> None:
  logging.warning("%s", msg)


class RunCheckpointer:
  """Keep-N, async, verified checkpoints of a training run under ``directory``.

  Args:
    directory: folder for the checkpoints (created; a local path is made absolute, a URL such as
      ``gs://bucket/run/checkpoints`` is kept as it is; see ``paths``).
    keep: number of most recent steps kept on disk.
    async_save: write in a background thread.
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 2, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep_checkpoints={keep} must be >= 1")
    self.directory = paths.resolve(directory)
    self.restored_step: int | None = None
    self._cleaned = False
    # No cleanup here: a reader (an evaluation next to a live run) must not delete the writer's
    # in-flight saves. The writer cleans before its first save (it holds the workdir lock).
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save, todelete_subdir=_TRASH
        ),
    )

  @property
  def corrupt_dir(self) -> str:
    return paths.join(self.directory, _CORRUPT)

  def _empty_trash(self) -> None:
    """Removes what keep-N deletion renamed away (only the primary process deletes)."""
    trash = paths.join(self.directory, _TRASH)
    if jax.process_index() == 0 and paths.isdir(trash):
      paths.rmtree(trash, ignore_errors=True)

  def _clean_uncommitted(self) -> None:
    """Removes what killed runs left: uncommitted ``<step>.orbax-checkpoint-tmp-*`` saves (a
    later save of the same step writes a fresh one) and the trash."""
    if jax.process_index() == 0 and paths.isdir(self.directory):
      for name in paths.listdir(self.directory):
        if ".orbax-checkpoint-tmp" in name:
          paths.rmtree(paths.join(self.directory, name), ignore_errors=True)
    self._empty_trash()

  def _step_dir(self, step: int) -> str:
    return paths.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    """The newest complete step on disk (verified only by ``restore``), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """True at the step where JAX's preemption service (multi-host TPU maintenance / spot
    notices, ``jax.distributed``) asks every process to save; False when it is not running."""
    return self._manager.reached_preemption(step)

  def save(self, step: int, state: Any, data_state: dict[str, Any], loop: dict[str, Any]) -> None:
    """Starts saving ``step`` (returns once the arrays are copied off the device).

    The JSON items are copied here: the caller may keep changing ``loop`` while the background
    thread writes.
    """
    # Orbax waits for the previous save anyway; after it, the step it rotated out is in trash/.
    self._manager.wait_until_finished()
    if not self._cleaned:
      self._clean_uncommitted()
      self._cleaned = True
    else:
      self._empty_trash()
    data_state, loop = _canonical_json(data_state), _canonical_json(loop)
    sums = leaf_checksums(state)
    specs = _leaf_specs(state)
    manifest = dict(
        version=MANIFEST_VERSION,
        step=int(step),
        leaves={k: dict(shape=specs[k][0], dtype=specs[k][1], checksum=sums[k]) for k in sums},
        json=dict(data=json_sha256(data_state), loop=json_sha256(loop)),
    )
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            loop=ocp.args.JsonSave(loop),
            manifest=ocp.args.JsonSave(manifest),
        ),
        force=True,
    )

  # ----------------------------------------------------------------------------------------------
  # Restore

  def restore(
      self, abstract_state: Any, step: int | None = None, *, warn: Callable[[str], None] | None = None
  ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Reads and verifies ``step`` into the structure/shardings of ``abstract_state``.

    Args:
      abstract_state: ``ShapeDtypeStruct`` leaves with the target shardings.
      step: a step (its corruption raises), or None: the newest intact step; every newer corrupt
        step is reported through ``warn`` and moved into ``corrupt/``.
      warn: where the loud warnings go (default: absl ``logging.warning``).

    Returns:
      (state, data_state, loop); ``self.restored_step`` is the step read.

    Raises:
      ValueError: no checkpoint.
      CheckpointMismatchError: the checkpoint's leaves differ from ``abstract_state`` (another
        model or optimizer), naming the leaf.
      CorruptCheckpointError: ``step`` (or every kept step) is corrupt, naming step and file.
    """
    warn = warn or _default_warn
    if step is not None:
      out = self._restore_verified(int(step), abstract_state, warn)
      self.restored_step = int(step)
      return out
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise ValueError(f"no checkpoint under {self.directory}")
    bad: list[CorruptCheckpointError] = []
    for s in steps:
      try:
        out = self._restore_verified(s, abstract_state, warn)
      except CorruptCheckpointError as e:
        bad.append(e)
        warn(f"CORRUPT CHECKPOINT: {e}")
        continue
      if bad:
        moved = [self._quarantine(e.step) for e in bad]
        warn(
            f"CORRUPT CHECKPOINT: step(s) {[e.step for e in bad]} could not be used; resuming "
            f"from step {s}, the newest intact one (the steps after it are re-done). The corrupt "
            f"step(s) were moved to {', '.join(moved)}."
        )
      self.restored_step = s
      return out
    raise CorruptCheckpointError(
        None,
        self.directory,
        "no intact step: " + "; ".join(f"step {e.step}: {e}" for e in bad) + ". Move the folder away to start over.",
    )

  def _quarantine(self, step: int) -> str:
    """Moves a corrupt step into ``corrupt/`` (primary process) and forgets it."""
    dst = paths.join(self.corrupt_dir, f"{step}.{time.strftime('%Y%m%dT%H%M%S')}")
    if jax.process_index() == 0 and paths.isdir(self._step_dir(step)):
      paths.makedirs(self.corrupt_dir, exist_ok=True)
      paths.rename(self._step_dir(step), dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"htgrpo_quarantine_{step}")
    self._manager.reload()
    return dst

  def _restore_item(self, step: int, name: str, args: Any) -> Any:
    return getattr(self._manager.restore(step, args=ocp.args.Composite(**{name: args})), name)

  def _restore_verified(self, step: int, abstract_state: Any, warn: Callable[[str], None]):
    step_dir = self._step_dir(step)
    item = lambda name: paths.join(step_dir, name)
    manifest = None
    if paths.isdir(item("manifest")):
      try:
        manifest = self._restore_item(step, "manifest", ocp.args.JsonRestore())
        leaves, hashes = manifest["leaves"], manifest["json"]
        if not isinstance(leaves, dict) or not isinstance(hashes, dict):
          raise ValueError("manifest lacks 'leaves'/'json'")
      except Exception as e:  # noqa: BLE001 (any failure to read it is corruption)
        raise CorruptCheckpointError(step, item("manifest"), f"unreadable manifest ({_short(e)})") from None
      self._check_matches(step, leaves, abstract_state)
    else:
      warn(
          f"checkpoint step {step} at {step_dir} has no manifest (written before checksums "
          "were recorded): restored unverified"
      )

    json_items = {}
    for name in ("data", "loop"):
      try:
        json_items[name] = self._restore_item(step, name, ocp.args.JsonRestore())
      except Exception as e:  # noqa: BLE001
        raise CorruptCheckpointError(step, item(name), f"unreadable JSON ({_short(e)})") from None
      if manifest is not None and json_sha256(json_items[name]) != hashes.get(name):
        raise CorruptCheckpointError(
            step, item(name), "its content differs from what was written " "(SHA-256 mismatch)"
        )
    try:
      state = self._restore_item(step, "state", ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # noqa: BLE001
      if manifest is None and isinstance(e, (ValueError, KeyError)):
        # No manifest to tell a different model from a damaged file: the pre-checksum behaviour.
        raise CheckpointMismatchError(
            f"checkpoint {self.directory} step {step} does not match this run's model/optimizer "
            f"({_short(e)}); use another workdir"
        ) from e
      raise CorruptCheckpointError(step, item("state"), f"array data unreadable " f"({_read_error(e)})") from None
    if manifest is not None:
      got = leaf_checksums(state)
      wrong = [k for k, v in got.items() if v != leaves[k]["checksum"]]
      if wrong:
        raise CorruptCheckpointError(
            step,
            item("state"),
            f"leaf {wrong[0]} reads back different "
            f"from what was written (checksum mismatch"
            f"{f'; {len(wrong) - 1} more leaves' if len(wrong) > 1 else ''})",
        )
    return state, json_items["data"], json_items["loop"]

  def _check_matches(self, step: int, leaves: dict[str, Any], abstract_state: Any) -> None:
    want = _leaf_specs(abstract_state)
    have = {k: (list(v["shape"]), v["dtype"]) for k, v in leaves.items()}
    diff = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if diff:
      k = diff[0]
      raise CheckpointMismatchError(
          f"checkpoint {self.directory} step {step} does not match this run's model/optimizer: "
          f"leaf {k} is {have.get(k, 'absent')} in the checkpoint, {want.get(k, 'absent')} here"
          f"{f' (+{len(diff) - 1} more leaves)' if len(diff) > 1 else ''}; use another workdir"
      )

  # ----------------------------------------------------------------------------------------------

  def wait(self) -> None:
    """Blocks until pending saves are on disk (re-raises a failed background save)."""
    self._manager.wait_until_finished()
    self._manager.check_for_errors()

  def close(self) -> None:
    """Waits for pending saves, then releases Orbax's threads; safe to call twice."""
    if self._manager is None:
      return
    try:
      self.wait()
      if self._cleaned:  # a writer: leave no trash behind
        self._empty_trash()
    finally:
      self._manager.close()
      self._manager = None


def step_dirs(directory: str | os.PathLike) -> list[int]:
  """The committed step folders under a checkpoint directory (by name, without starting Orbax;
  uncommitted saves are ``<step>.orbax-checkpoint-tmp-*``, not plain integers)."""
  directory = os.fspath(directory)
  if not paths.isdir(directory):
    return []
  return sorted(int(n) for n in paths.listdir(directory) if n.isdigit() and paths.isdir(paths.join(directory, n)))


def abstract_like(tree: Any, shardings: Any = None) -> Any:
  """``ShapeDtypeStruct`` leaves of ``tree`` with ``shardings`` (a matching pytree), or the leaves'
  own shardings when None: the target a restore lays the arrays out on."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
