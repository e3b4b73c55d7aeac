"""Device mesh, logical-axis rules and sharding helpers.

One mesh with axes ``('data', 'fsdp', 'tensor')`` shards the sampler and the train step alike.
Model code names *logical* axes on parameters and activations; the single table ``LOGICAL_RULES``
maps them onto mesh axes (MaxText's scheme). Batch-like leading dimensions are split over
``('data', 'fsdp')``; parameters are split over ``fsdp`` (their ``embed`` dimension) and ``tensor``
(heads, mlp, vocab).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (or None = replicated). Flax applies the first rule whose mesh axis is
# still free in the spec, so an activation [batch, length, embed] keeps batch on ('data','fsdp')
# and leaves embed replicated, while a kernel [embed, mlp] shards embed over fsdp.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("layers", None),
    ("embed", "fsdp"),
    ("embed", None),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("codebook", "tensor"),
    # LoRA's rank dimension: the B matrices' input (their output dims follow their kernels), split
    # FSDP-style so no chip holds them whole (the rank must divide by fsdp).
    ("lora_rank", "fsdp"),
    ("lora_rank", None),
)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None, num_devices: int = 0
) -> Mesh:
  """Builds the ``('data', 'fsdp', 'tensor')`` mesh. One size may be -1 (= the devices left).

  Args:
    data, fsdp, tensor: axis sizes; one may be -1.
    devices: the devices to use (default: all of ``jax.devices()``).
    num_devices: when > 0, only the first ``num_devices`` of them (e.g. one CPU of many).

  Raises:
    ValueError: the sizes do not multiply to the device count, naming the sizes.
  """
  devices = list(devices if devices is not None else jax.devices())
  if num_devices:
    if not 0 < num_devices <= len(devices):
      raise ValueError(f"mesh: num_devices={num_devices} but {len(devices)} devices are available")
    devices = devices[:num_devices]
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices do not divide by fsdp*tensor*... = {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
        f"mesh: data*fsdp*tensor = {sizes} needs {int(np.prod(sizes))} devices, " f"{len(devices)} are available"
    )
  # Auto axes: shardings are propagated by XLA from in/out_shardings and logical constraints
  # (MaxText's model), not carried in the types as JAX 0.10's default Explicit axes would.
  return jax.make_mesh(
      tuple(sizes), MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  )


def auto_mesh(mesh: Mesh) -> Mesh:
  """The same devices and axis names with every axis in Auto (GSPMD-propagated) mode.

  Under Explicit axes (jax 0.10's ``jax.make_mesh`` default) shardings are part of the types and
  ordinary model ops (an embedding gather on a batch-sharded index, sorts, ``jnp.repeat``) fail to
  trace. The sampler and the train step pin only their inputs and outputs and let XLA propagate
  the rest, so they run on the Auto twin of whatever mesh a caller hands them.
  """
  if all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))


def onto_mesh(tree: Any, mesh: Mesh) -> Any:
  """Relabels arrays laid out on a twin of ``mesh`` (same devices, other axis types) onto it."""

  def move(x):
    sh = getattr(x, "sharding", None)
    if (
        isinstance(sh, NamedSharding)
        and sh.mesh is not mesh
        and sh.mesh != mesh
        and sh.mesh.axis_names == mesh.axis_names
        and sh.mesh.devices.shape == mesh.devices.shape
        and (sh.mesh.devices == mesh.devices).all()
    ):
      return jax.device_put(x, NamedSharding(mesh, sh.spec))
    return x

  return jax.tree.map(move, tree)


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """Maps a pytree of logical ``PartitionSpec``s (e.g. from ``nn.get_partition_spec``) to
  ``NamedSharding``s on ``mesh``."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension over ``('data', 'fsdp')``, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shardings(tree: Any, mesh: Mesh) -> Any:
  """A ``batch_sharding`` per leaf (scalars replicated), for ``in_shardings`` of batch pytrees."""
  return jax.tree.map(lambda x: batch_sharding(mesh, np.ndim(x)) if np.ndim(x) else replicated(mesh), tree)


def batch_size_divisor(mesh: Mesh) -> int:
  """Batch sizes must be multiples of this (the product of the batch mesh axes)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Places a host batch on the mesh, leading dimension split over ``('data', 'fsdp')``.

  Raises:
    ValueError: a leaf's leading dimension does not divide by the batch axes, naming the leaf.
  """
  div = batch_size_divisor(mesh)
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if np.ndim(leaf) and np.shape(leaf)[0] % div:
      raise ValueError(
          f"batch leaf {jax.tree_util.keystr(path)} has leading dim "
          f"{np.shape(leaf)[0]}, not a multiple of data*fsdp = {div}"
      )
  return jax.device_put(tree, batch_shardings(tree, mesh))


def global_batch(x: Any, mesh: Mesh) -> jax.Array:
  """A host array holding the *whole* batch (identical on every process) as a global jax.Array
  split over ``('data', 'fsdp')``; each process supplies only the rows its devices own.
  Works unchanged on one host and on a multi-host slice."""
  x = np.asarray(x)
  if x.ndim and x.shape[0] % batch_size_divisor(mesh):
    raise ValueError(
        f"batch of shape {x.shape}: leading dim is not a multiple of data*fsdp = " f"{batch_size_divisor(mesh)}"
    )
  sharding = batch_sharding(mesh, x.ndim) if x.ndim else replicated(mesh)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def global_replicated(x: Any, mesh: Mesh) -> jax.Array:
  """A host array (identical on every process) as a global jax.Array replicated over ``mesh``;
  works unchanged on one host and on a multi-host slice."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, replicated(mesh), lambda idx: x[idx])


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-host) global array as numpy on every process."""
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def initialize_distributed(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
  """Starts JAX's multi-process runtime where the job has several processes; call it first thing,
  before anything touches a device. Idempotent; returns whether JAX runs multi-process.

  Args:
    mode: 'auto' lets JAX's own cluster detection decide: a Cloud TPU VM slice (found through the
      TPU metadata server, with no environment variable to set), GKE, SLURM, Open MPI, or an
      explicit coordinator below / in ``JAX_COORDINATOR_ADDRESS``; where it finds none the run is
      one process. 'off' never initialises; 'explicit' requires the three values below.
    coordinator_address: 'host:port' of process 0's coordinator (other clusters, and the tests'
      several processes on one machine); env ``JAX_COORDINATOR_ADDRESS``.
    num_processes, process_id: env ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` when None.

  Raises:
    ValueError: an unknown mode, or an explicit setup with a value missing (named).
  """
  if mode not in ("auto", "off", "explicit"):
    raise ValueError(f"mode={mode!r} must be 'auto', 'off' or 'explicit'")
  if mode == "off":
    return False
  if jax.distributed.is_initialized():
    return True
  env = lambda k: os.environ.get(k) or None
  coordinator_address = coordinator_address or env("JAX_COORDINATOR_ADDRESS")
  num_processes = num_processes if num_processes is not None else env("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else env("JAX_PROCESS_ID")
  given = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  if mode == "explicit" or any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    if missing and mode == "explicit":
      raise ValueError(
          f"an explicit multi-process setup needs {missing[0]} (flag --{missing[0]} or "
          f"env JAX_{missing[0].upper()}); missing: {missing}"
      )
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
      # Several CPU processes (this machine's tests) need a cross-process collectives backend.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from jax._src import xla_bridge  # no public way to ask whether JAX's backend is already up

    if xla_bridge.backends_are_initialized():
      raise ValueError(
          "a multi-process run (--coordinator_address ... or JAX_COORDINATOR_ADDRESS / "
          "JAX_NUM_PROCESSES / JAX_PROCESS_ID set) must initialise before JAX runs "
          "anything in this process; start the trainer in a fresh process"
      )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=None if num_processes is None else int(num_processes),
        process_id=None if process_id is None else int(process_id),
    )
    return True
  try:
    jax.distributed.initialize()
  except ValueError as e:
    if "coordinator_address should be defined" in str(e):
      return False  # JAX found no cluster around this process: a single-process run
    raise
  except RuntimeError as e:
    if "must be called before" not in str(e):
      raise
    # JAX already runs in this process (a library user's program, a test calling train() twice):
    # whatever it started with stands.
    return jax.process_count() > 1
  return True


def check_same_everywhere(name: str, text: str) -> None:
  """Raises ValueError naming ``name`` unless every process holds the same ``text`` (e.g. the run's
  config): processes that disagree would otherwise compile different programs and hang."""
  if jax.process_count() == 1:
    return
  import hashlib
  from jax.experimental import multihost_utils

  digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
  everyone = np.asarray(multihost_utils.process_allgather(digest))
  bad = [i for i, d in enumerate(everyone.reshape(jax.process_count(), -1)) if (d != digest).any()]
  if bad:
    raise ValueError(
        f"{name} differs between processes: process {jax.process_index()} disagrees with "
        f"process(es) {bad}; every host must run the same command and files"
    )


def is_primary() -> bool:
  """Whether this process writes the run's host-side files, logs and progress (process 0)."""
  return jax.process_index() == 0


def maybe_initialize_distributed() -> bool:
  """``initialize_distributed('auto')`` (kept for callers without a config)."""
  return initialize_distributed("auto")
