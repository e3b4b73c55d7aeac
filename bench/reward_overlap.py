"""Rollout time with the reward scored while the next part samples, against scoring after sampling.

  python bench/reward_overlap.py                  # 8 prompts x G 8, T 12, 4 parts, server delay 0.4 s
  python bench/reward_overlap.py --quick          # a smoke run (B 16, T 4, 3 repeats)
  python bench/reward_overlap.py --delay_s=1.0 --chunks=8

A deliberately slow reward server runs on localhost (``rewards.server.make_server``, the project's
JSON protocol): it sleeps ``--delay_s`` per request, then scores with the ShapeEval verifier. The
policy is bench/sampler.py's toy Linen transformer (random weights, 8 x 8 tokens, CFG), the decoder
a jitted code -> colour map, both on the default JAX device. Three ways of collecting one step's
rollouts (``rollouts.collect_rollouts``, the trainer's own function) run interleaved, each once per
repeat, so load changes hit all alike:

  whole          rollout.chunks=1: sample all images, then one reward request
  sequential     rollout.chunks=K, max_in_flight=0: each part sampled, then scored (K requests)
  overlapped     rollout.chunks=K, max_in_flight=2: part k scored while part k+1 samples
  sampling only  rollout.chunks=K with an instant in-process reward: the floor overlap can reach

It prints the median seconds of each, the ratios, the share of the reward wait that overlap hid,
(sequential - overlapped) / (sequential - sampling only), and checks that sequential and overlapped
runs gave the same rewards and tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from htgrpo_jax import parallel, rollouts, run_config  # noqa: E402
from htgrpo_jax.config_util import load_config_file  # noqa: E402
from htgrpo_jax.rewards import server  # noqa: E402
from htgrpo_jax.rewards.remote import RemoteReward  # noqa: E402
from htgrpo_jax.sampling import make_sampler  # noqa: E402
from htgrpo_jax.worlds.shapeeval import grammar  # noqa: E402
from htgrpo_jax.worlds.shapeeval.reward import build_shapeeval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _toy_policy():
  spec = importlib.util.spec_from_file_location("_bench_sampler", ROOT / "bench" / "sampler.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # its dataclasses look their module up
  spec.loader.exec_module(mod)
  return mod.toy_policy((8, 8), 128, 16, jax.random.key(0))


def slow_server(delay_s: float):
  """A localhost server whose /dense sleeps ``delay_s`` per request before scoring."""
  verifier = build_shapeeval(mode="dense", on_invalid="zero")

  def slow(prompts, images, **meta):
    time.sleep(delay_s)
    return verifier(prompts, images, **meta)

  srv = server.make_server({"dense": slow})
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  return srv, f"http://127.0.0.1:{srv.server_address[1]}/dense"


def plan_for(args, chunks: int, in_flight: int) -> run_config.Plan:
  c = load_config_file(str(ROOT / "configs" / "geneval.py"))
  c.prompts_per_step, c.rl.group_size, c.sampler.num_steps = args.prompts, args.group, args.steps
  c.rl.micro_batch_size = None
  c.rollout.chunks, c.rollout.max_in_flight = chunks, in_flight
  return run_config.plan(c)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="4 prompts x G 4, T 4, 3 repeats")
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--group", type=int, default=8)
  ap.add_argument("--steps", type=int, default=12)
  ap.add_argument("--chunks", type=int, default=4)
  ap.add_argument("--delay_s", type=float, default=0.4, help="server sleep per request")
  ap.add_argument("--repeats", type=int, default=7)
  args = ap.parse_args(argv)
  if args.quick:
    args.prompts, args.group, args.steps, args.repeats = 4, 4, 4, 3

  fn, params, n, prompt_fn, uncond_fn, desc = _toy_policy()
  mesh = parallel.make_mesh(-1, 1, 1)
  srv, url = slow_server(args.delay_s)
  reward = RemoteReward(url, name="slow_dense", metadata_keys=("meta",), timeout=600)
  palette = jnp.asarray(np.random.default_rng(1).integers(0, 256, (128, 3)), jnp.uint8)
  decode = jax.jit(
      lambda codes: jnp.repeat(jnp.repeat(palette[codes].reshape(codes.shape[0], 8, 8, 3), 4, axis=1), 4, axis=2)
  )  # 32 x 32 px
  ps = grammar.balanced_prompts("eval", args.prompts, seed=0)
  batch = {
      "prompt_tokens": prompt_fn(args.prompts, np.random.default_rng(0)),
      "caption": np.array([p.text for p in ps]),
      "meta": np.array([p.meta.to_json() for p in ps]),
  }

  modes = {
      "whole": (1, 2),
      "sequential": (args.chunks, 0),
      "overlapped": (args.chunks, 2),
      "sampling only": (args.chunks, 0),
  }
  instant = lambda prompts, images, **_: np.zeros(len(prompts), np.float32)
  runs = {}
  for name, (k, f) in modes.items():
    p = plan_for(args, k, f)
    run_config.check_mesh(p, mesh)
    sampler = make_sampler(fn, p.rollout_sampler, num_tokens=n, mesh=mesh)
    uncond = parallel.global_batch(uncond_fn(p.chunk_prompts * p.rl.group_size), mesh)
    runs[name] = lambda p=p, sampler=sampler, uncond=uncond, r=(
        instant if name == "sampling only" else reward
    ): rollouts.collect_rollouts(
        sampler, params, batch, jax.random.key(7), p=p, uncond=uncond, decode=decode, reward=r, mesh=mesh
    )

  outs = {name: jax.block_until_ready(run()) for name, run in runs.items()}  # compile, warm up
  times = {name: [] for name in runs}
  for _ in range(args.repeats):
    for name, run in runs.items():  # interleaved
      t = time.perf_counter()
      jax.block_until_ready(run()[0])
      times[name].append(time.perf_counter() - t)
  srv.shutdown()
  srv.server_close()

  same = np.array_equal(outs["sequential"][1].rewards, outs["overlapped"][1].rewards) and np.array_equal(
      np.asarray(outs["sequential"][0].image_tokens), np.asarray(outs["overlapped"][0].image_tokens)
  )
  med = {k: statistics.median(v) for k, v in times.items()}
  b = args.prompts * args.group
  print(
      f"policy: {desc}; {b} images ({args.prompts} prompts x G {args.group}), T {args.steps}, "
      f"{jax.devices()[0].platform} x {len(jax.devices())}; server delay {args.delay_s:g} s/request, "
      f"{args.chunks} parts, {args.repeats} interleaved repeats"
  )
  for k, v in med.items():
    print(f"{k:>13}: median {v:.3f} s per rollout (min {min(times[k]):.3f}, max {max(times[k]):.3f})")
  print(f"overlapped / sequential = {med['overlapped'] / med['sequential']:.3f}")
  print(f"overlapped / whole      = {med['overlapped'] / med['whole']:.3f}")
  wait = med["sequential"] - med["sampling only"]
  print(
      f"reward wait hidden by overlap = (sequential - overlapped) / (sequential - sampling only) = "
      f"{(med['sequential'] - med['overlapped']) / wait:.2f}"
      if wait > 0
      else "reward wait hidden: sequential was not slower than sampling only (noise)"
  )
  print(f"sequential and overlapped rewards and tokens identical: {same}")
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
