"""Mesh construction, the logical-axis rules and batch sharding on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from htgrpo_jax import parallel


def test_make_mesh_fills_the_free_axis():
  mesh = parallel.make_mesh(-1, 2, 2)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert parallel.batch_size_divisor(mesh) == 4


@pytest.mark.parametrize(
    "sizes, match",
    [
        ((3, 1, 1), "needs 3 devices"),
        ((-1, -1, 1), "at most one"),
        ((-1, 3, 1), "do not divide"),
        ((0, 1, 1), "positive"),
    ],
)
def test_make_mesh_rejects_bad_sizes(sizes, match):
  with pytest.raises(ValueError, match=match):
    parallel.make_mesh(*sizes)


def test_rules_shard_params_and_activations_differently():
  mesh = parallel.make_mesh(2, 2, 2)
  specs = {"kernel": P("embed", "mlp"), "act": P("batch", "length", "embed"), "head": P("embed", "vocab")}
  sh = parallel.logical_to_sharding(specs, mesh)
  assert sh["kernel"].spec == P("fsdp", "tensor")
  # The batch already uses fsdp, so the activation's embed dim falls through to replicated.
  assert sh["act"].spec == P(("data", "fsdp"), None, None)
  assert sh["head"].spec == P("fsdp", "tensor")


def test_shard_batch_splits_leading_dim_and_names_bad_leaf():
  mesh = parallel.make_mesh(2, 2, 2)
  batch = {"tokens": np.arange(16 * 3, dtype=np.int32).reshape(16, 3), "scale": np.float32(2.0)}
  out = parallel.shard_batch(batch, mesh)
  assert out["tokens"].sharding.spec == P(("data", "fsdp"), None)
  assert len(out["tokens"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(out["tokens"]), batch["tokens"])
  with pytest.raises(ValueError, match=r"\['rewards'\].*leading dim 6"):
    parallel.shard_batch({"rewards": jnp.zeros(6)}, mesh)


def test_single_host_does_not_initialize_distributed(monkeypatch):
  for k in ("TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(k, raising=False)
  assert parallel.maybe_initialize_distributed() is False
  assert jax.process_count() == 1
