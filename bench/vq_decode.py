"""VQ decoder throughput on this host and AOT per-device memory of a sharded rollout-batch decode.

  python bench/vq_decode.py                                  # both decoders, 512x512, CPU + AOT
  python bench/vq_decode.py --which=vqgan --size=1024 --aot_size=1024 --reps=2
  python bench/vq_decode.py --skip_cpu --topology=v5p:4x4x4 --fsdp=16 --tensor=4 --aot_batch=64

Part 1 times ``make_decode(config)(params, codes)`` on random full-size params (fp32, like the
references): ``--reps`` timed calls after a warm-up/compile call, median images/s.
Part 2 lowers the decode with the batch split over ``('data', 'fsdp')`` (params replicated) for a
libtpu topology description and prints ``compiled.memory_analysis()`` per device; the ``tensor``
axis holds replicas of the same images (the decode does not shard within an image).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from htgrpo_jax import parallel
from htgrpo_jax.models.vq import magvit2, vqgan

DECODERS = {"magvit2": (magvit2, "mmada"), "vqgan": (vqgan, "dimoo")}


def _config(name: str, dtype=jnp.float32):
  mod, preset = DECODERS[name]
  return mod, dataclasses.replace(mod.PRESETS[preset], dtype=dtype)


def n_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def time_cpu(name: str, size: int, batch: int, reps: int) -> float:
  """Median images/s of the jitted decode at ``size x size`` on the default backend."""
  mod, cfg = _config(name)
  params = jax.jit(lambda k: mod.init_params(cfg, k))(jax.random.key(0))
  s = size // cfg.scale
  codes = jax.random.randint(jax.random.key(1), (batch, s, s), 0, 8192, jnp.int32)
  fn = mod.make_decode(cfg)
  t0 = time.perf_counter()
  fn(params, codes).block_until_ready()
  print(
      f"[{name}] {n_params(params) / 1e6:.2f}M params; compile + first call " f"{time.perf_counter() - t0:.1f} s",
      flush=True,
  )
  times = []
  for r in range(reps):
    t0 = time.perf_counter()
    fn(params, codes).block_until_ready()
    times.append(time.perf_counter() - t0)
    print(f"[{name}] rep {r + 1}/{reps}: {times[-1]:.2f} s for {batch} image(s)", flush=True)
  ips = batch / statistics.median(times)
  print(
      f"[{name}] {size}x{size}: median {statistics.median(times):.2f} s/batch -> {ips:.3f} images/s "
      f"on {jax.devices()[0].platform} ({os.cpu_count()} cpus visible)",
      flush=True,
  )
  return ips


def aot_memory(name: str, size: int, batch: int, topology: str, fsdp: int, tensor: int, dtype):
  """Compiles the sharded decode for a TPU topology description; returns (memory_analysis, s, mesh)."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from aot_forward import topology_mesh  # sets ALLOW_MULTIPLE_LIBTPU_LOAD before loading libtpu

  mod, cfg = _config(name, dtype)
  mesh = topology_mesh(topology, fsdp, tensor)
  if batch % parallel.batch_size_divisor(mesh):
    raise ValueError(f"--aot_batch={batch} is not a multiple of data*fsdp={parallel.batch_size_divisor(mesh)}")
  rep = parallel.replicated(mesh)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), mod.abstract_params(cfg))
  s = size // cfg.scale
  codes = jax.ShapeDtypeStruct((batch, s, s), jnp.int32, sharding=parallel.batch_sharding(mesh, 3))
  t0 = time.perf_counter()
  compiled = mod.make_decode(cfg, mesh).lower(params, codes).compile()
  return compiled.memory_analysis(), time.perf_counter() - t0, mesh


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--which", default="both", choices=["both", *DECODERS])
  ap.add_argument("--size", type=int, default=512, help="CPU timing image side (multiple of 16)")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--skip_cpu", action="store_true")
  ap.add_argument("--skip_aot", action="store_true")
  ap.add_argument("--topology", default="v5p:4x4x4")
  ap.add_argument("--fsdp", type=int, default=16)
  ap.add_argument("--tensor", type=int, default=4)
  ap.add_argument("--aot_batch", type=int, default=64, help="rollout images decoded at once")
  ap.add_argument("--aot_size", type=int, default=512)
  ap.add_argument("--aot_dtype", default="float32", choices=["float32", "bfloat16"])
  args = ap.parse_args()
  names = list(DECODERS) if args.which == "both" else [args.which]
  if not args.skip_cpu:
    for name in names:
      time_cpu(name, args.size, args.batch, args.reps)
  if not args.skip_aot:
    gib = lambda b: b / 2**30
    for name in names:
      mem, secs, mesh = aot_memory(
          name, args.aot_size, args.aot_batch, args.topology, args.fsdp, args.tensor, jnp.dtype(args.aot_dtype)
      )
      per = args.aot_batch // parallel.batch_size_divisor(mesh)
      print(
          f"[{name}] AOT {args.aot_dtype} decode of {args.aot_batch} x {args.aot_size}^2 on {args.topology} "
          f"(mesh {dict(mesh.shape)}, {per} image(s)/device), compile {secs:.1f} s; per device: "
          f"arguments {gib(mem.argument_size_in_bytes):.3f} GiB, outputs {gib(mem.output_size_in_bytes):.3f} GiB, "
          f"temps {gib(mem.temp_size_in_bytes):.3f} GiB; total "
          f"{gib(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes):.3f} GiB",
          flush=True,
      )


if __name__ == "__main__":
  main()
