"""AOT-compiles the sharded 8B policy forward for a TPU topology on this CPU machine.

  python bench/aot_forward.py --preset=mmada_8b --topology=v5p:4x4x4 --fsdp=16 --tensor=4 --batch=64

Uses libtpu's topology descriptions (no TPU needed) and prints per-device memory from
``compiled.memory_analysis()``. The forward is the policy's ``logits_fn`` maths: the MMaDA T2I
sequence (L=1539; 1024 image slots at [514, 1538); head rows [126349, 126349+8192)). Libtpu prints
harmless TPU_WORKER_HOSTNAMES warnings on a CPU machine.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from htgrpo_jax import parallel
from htgrpo_jax.models import llada

# MMaDA T2I layout constants (layouts.MMaDALayout defaults), so no tokenizer is needed here.
MMADA_SEQ_LEN = 1539
MMADA_SLOTS = np.arange(MMADA_SEQ_LEN - 1025, MMADA_SEQ_LEN - 1)
MMADA_HEAD_ROWS = (126349, 8192)


def topology_mesh(topology: str, fsdp: int, tensor: int) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over a TPU topology description (Auto axis types)."""
  # Several AOT compiles may run at once on a build box; without this libtpu's lockfile makes the
  # second process fail ("Internal error when accessing libtpu multi-process lockfile").
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  devices = np.array(topologies.get_topology_desc(topology, "tpu").devices)
  if devices.size % (fsdp * tensor):
    raise ValueError(f"topology {topology} has {devices.size} chips, not divisible by fsdp*tensor={fsdp * tensor}")
  return Mesh(devices.reshape(-1, fsdp, tensor), parallel.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def compile_forward(
    config: llada.LLaDAConfig,
    mesh: Mesh,
    batch: int,
    seq_len: int = MMADA_SEQ_LEN,
    select: np.ndarray = MMADA_SLOTS,
    head_rows=MMADA_HEAD_ROWS,
):
  """Lowers and compiles the sharded forward on abstract inputs; returns (compiled, seconds)."""
  model = llada.LLaDA(config)
  boxed = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 4), jnp.int32))["params"], jax.random.key(0))
  shardings = parallel.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
  params = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), nn.meta.unbox(boxed), shardings
  )
  tok_sharding = parallel.batch_sharding(mesh, 2)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=tok_sharding)

  def forward(params, tokens):
    with nn.logical_axis_rules(parallel.LOGICAL_RULES):
      return model.apply({"params": params}, tokens, select=select, head_rows=head_rows)

  out_sharding = NamedSharding(mesh, P(parallel.BATCH_AXES, None, "tensor"))
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = (
        jax.jit(forward, in_shardings=(shardings, tok_sharding), out_shardings=out_sharding)
        .lower(params, tokens)
        .compile()
    )
  return compiled, time.perf_counter() - start


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="mmada_8b", choices=sorted(llada.PRESETS))
  ap.add_argument("--topology", default="v5p:4x4x4")
  ap.add_argument("--fsdp", type=int, default=16)
  ap.add_argument("--tensor", type=int, default=4)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--n_layers", type=int, default=0, help="override depth (0 = preset)")
  args = ap.parse_args()
  cfg = llada.get_config(args.preset, **({"n_layers": args.n_layers} if args.n_layers else {}))
  mesh = topology_mesh(args.topology, args.fsdp, args.tensor)
  compiled, secs = compile_forward(cfg, mesh, args.batch)
  mem = compiled.memory_analysis()
  gib = lambda b: b / 2**30
  print(
      f"{args.preset} ({cfg.n_layers} layers, {cfg.num_params() / 1e9:.2f}B params) forward, batch {args.batch} x "
      f"{MMADA_SEQ_LEN} tokens on {args.topology} ({mesh.devices.size} chips, mesh {dict(mesh.shape)})"
  )
  print(
      f"compile {secs:.1f} s; per device: arguments {gib(mem.argument_size_in_bytes):.2f} GiB, "
      f"outputs {gib(mem.output_size_in_bytes):.2f} GiB, temps {gib(mem.temp_size_in_bytes):.2f} GiB, "
      f"generated code {gib(mem.generated_code_size_in_bytes):.3f} GiB; total "
      f"{gib(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes):.2f} GiB"
  )


if __name__ == "__main__":
  main()
