"""Forward throughput (tokens/s) of the small LLaDA presets, jitted, median of repeats.

  python bench/forward.py [--batch=64 --prompt=16 --slots=64 --repeats=10]

The sequence mimics the embedded ShapeEval layout (prompt + 8x8 image slots) and the forward is
``logits_fn``'s: hidden states of the slots only, LM head sliced to a 128-entry codebook.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from htgrpo_jax.models import llada


def bench(name: str, batch: int, prompt: int, slots: int, repeats: int, codebook: int = 128):
  cfg = llada.get_config(name)
  model = llada.LLaDA(cfg)
  length = prompt + slots
  tokens = jax.random.randint(jax.random.key(0), (batch, length), 0, cfg.vocab_size)
  params = jax.jit(model.init)(jax.random.key(1), tokens[:1])["params"]
  select = np.arange(prompt, length)
  head_rows = (cfg.vocab_size - codebook, codebook)
  fwd = jax.jit(lambda p, t: model.apply({"params": p}, t, select=select, head_rows=head_rows))
  fwd(params, tokens).block_until_ready()  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fwd(params, tokens).block_until_ready()
    times.append(time.perf_counter() - start)
  med = float(np.median(times))
  n = llada.count_params(params)
  print(
      f"{name:7s} ({n / 1e6:.2f}M params, d={cfg.d_model}, {cfg.n_layers} layers) batch {batch} x {length} tokens: "
      f"median {med * 1e3:.1f} ms -> {batch * length / med:,.0f} tokens/s"
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--prompt", type=int, default=16)
  ap.add_argument("--slots", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=10)
  args = ap.parse_args()
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
  for name in ("tiny", "shapes"):
    bench(name, args.batch, args.prompt, args.slots, args.repeats)


if __name__ == "__main__":
  main()
