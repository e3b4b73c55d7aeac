"""AOT per-device memory of the on-device reward programs for a TPU topology, on this CPU machine.

  python bench/aot_rewards.py                                   # v5p:4x4x4, 64 images of 512x512
  python bench/aot_rewards.py --programs=detect --dtype=bfloat16 --fsdp=4 --tensor=1

Programs (batch split over ``('data', 'fsdp')``, params replicated; the ``tensor`` axis holds
replicas of the same images, as for the VQ decode in bench/vq_decode.py):
  detect     ``geneval_reward.detect_images``: OWLv2 preprocessing + detector (``--owl`` preset) with
             ``--queries`` text queries per image;
  colors     ``rewards.clip.color_logits``: GenEval's colour classifier (``--clip`` preset, ViT-L/14 as
             GenEval) on ``--objects`` boxes per image;
  clipscore  ``rewards.clip.clip_score`` (``--clip`` preset).
Prints ``compiled.memory_analysis()`` per device (arguments, outputs, temps) and compile seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp

from htgrpo_jax import parallel
from htgrpo_jax.models import clip, owl
from htgrpo_jax.rewards import clip as clip_rewards
from htgrpo_jax.rewards import geneval_reward

PROGRAMS = ("detect", "colors", "clipscore")


def _abstract(tree_fn, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), jax.eval_shape(tree_fn))


def compile_program(program: str, args, mesh):
  rep, dtype = parallel.replicated(mesh), jnp.dtype(args.dtype)
  b, s = args.batch, args.size
  images = jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8, sharding=parallel.batch_sharding(mesh, 4))
  if program == "detect":
    oc = owl.PRESETS[args.owl]
    oc = dataclasses.replace(oc, clip=dataclasses.replace(oc.clip, dtype=dtype, param_dtype=dtype))
    params = _abstract(lambda: owl.init_params(oc), rep)
    p = oc.clip.projection_dim
    queries = jax.ShapeDtypeStruct((b, args.queries, p), jnp.float32, sharding=parallel.batch_sharding(mesh, 3))
    mask = jax.ShapeDtypeStruct((b, args.queries), bool, sharding=parallel.batch_sharding(mesh, 2))
    return geneval_reward.detect_images.lower(params, images, queries, mask, oc).compile()
  cc = dataclasses.replace(clip.PRESETS[args.clip], dtype=dtype, param_dtype=dtype)
  params = _abstract(lambda: clip.init_params(cc), rep)
  if program == "colors":
    k = args.objects
    boxes = jax.ShapeDtypeStruct((b, k, 4), jnp.float32, sharding=parallel.batch_sharding(mesh, 3))
    weights = jax.ShapeDtypeStruct(
        (b, k, 10, cc.projection_dim), jnp.float32, sharding=parallel.batch_sharding(mesh, 4)
    )
    return clip_rewards.color_logits.lower(params, images, boxes, None, weights, cc).compile()
  ids = jax.ShapeDtypeStruct((b, cc.text.max_length), jnp.int32, sharding=parallel.batch_sharding(mesh, 2))
  return clip_rewards.clip_score.lower(params, images, ids, cc).compile()


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--programs", default=",".join(PROGRAMS))
  ap.add_argument("--topology", default="v5p:4x4x4")
  ap.add_argument("--fsdp", type=int, default=16)
  ap.add_argument("--tensor", type=int, default=4)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--size", type=int, default=512)
  ap.add_argument("--queries", type=int, default=4, help="detector text queries per image (GenEval: <= 2 classes)")
  ap.add_argument("--objects", type=int, default=16, help="colour-classified boxes per image (padded)")
  ap.add_argument("--owl", default="owlv2_b16", choices=sorted(owl.PRESETS))
  ap.add_argument("--clip", default="vit_l14", choices=sorted(clip.PRESETS))
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = ap.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from aot_forward import topology_mesh  # sets ALLOW_MULTIPLE_LIBTPU_LOAD before loading libtpu

  mesh = topology_mesh(args.topology, args.fsdp, args.tensor)
  if args.batch % parallel.batch_size_divisor(mesh):
    raise ValueError(f"--batch={args.batch} is not a multiple of data*fsdp={parallel.batch_size_divisor(mesh)}")
  gib = lambda v: v / 2**30
  per = args.batch // parallel.batch_size_divisor(mesh)
  for program in args.programs.split(","):
    if program not in PROGRAMS:
      raise ValueError(f"--programs: {program!r} is not one of {PROGRAMS}")
    t0 = time.perf_counter()
    mem = compile_program(program, args, mesh).memory_analysis()
    model = args.owl if program == "detect" else args.clip
    print(
        f"[{program}] {model} {args.dtype}, {args.batch} x {args.size}^2 on {args.topology} (mesh "
        f"{dict(mesh.shape)}, {per} image(s)/device), compile {time.perf_counter() - t0:.1f} s; per device: "
        f"arguments {gib(mem.argument_size_in_bytes):.3f} GiB, outputs {gib(mem.output_size_in_bytes):.4f} GiB, "
        f"temps {gib(mem.temp_size_in_bytes):.3f} GiB; total "
        f"{gib(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes):.3f} GiB",
        flush=True,
    )


if __name__ == "__main__":
  main()
