"""Sampler throughput and overhead, measured side by side in one run.

  python bench/sampler.py            # shapes preset: d=128, 4 layers, 8x8 tokens, C=128, B=64, T=12, CFG
  python bench/sampler.py --quick    # a few-second smoke run (B=16, T=4)
  python bench/sampler.py --model=toy --rule=emerge --cfg=0
  python bench/sampler.py --cache                        # the rollout cache vs the plain sampler
  python bench/sampler.py --cache --grid=32 --layers=2 --batch=8   # 1024 image tokens, seq 1040
  python bench/sampler.py --spread=1                     # also MaskGIT with spread commits, interleaved

Prints images/s and the overhead ratio = sampler time / (T x time of one batched CFG forward of
the same shape), both medians over interleaved repeats (target <= 1.15). ``--spread=R`` times a
second sampler, the same config with ``SamplerConfig.spread=R``, in the same loop and prints the
ratio of the two medians. The model is the
project's LLaDA policy (``htgrpo_jax.models``) with the ShapeEval layout; ``--model=toy`` uses a
small Linen transformer defined here with the same sizes (only when asked: a broken models package
fails the bench instead of silently timing another model).

``--cache`` instead times ``sample`` without and with the rollout cache (``SamplerConfig.cache``,
Lumina-DiMOO's ML-Cache; ``--cache-ratio``, ``--cache-warmup``, ``--cache-refresh``), interleaved,
and prints both medians, the speed ratio and how many tokens the two draw alike from one key.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from htgrpo_jax.contracts import MASK  # noqa: E402
from htgrpo_jax.sampling import SamplerConfig, guided_logits, make_sampler  # noqa: E402


class ToyTransformer(nn.Module):
  """Pre-norm bidirectional transformer over [prompt | canvas] -> codebook logits at the slots."""

  vocab: int
  codebook: int
  d: int = 128
  layers: int = 4
  heads: int = 4
  mlp: int = 512

  @nn.compact
  def __call__(self, prompt, canvas):
    mask_id = self.vocab  # slots: MASK -> mask_id, code c -> vocab + 1 + c
    slots = jnp.where(canvas == MASK, mask_id, canvas + self.vocab + 1)
    tokens = jnp.concatenate([prompt, slots], axis=1)
    x = nn.Embed(self.vocab + 1 + self.codebook, self.d)(tokens)
    x = x + self.param("pos", nn.initializers.normal(0.02), (tokens.shape[1], self.d))
    for _ in range(self.layers):
      h = nn.RMSNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(self.heads, use_bias=False)(h, h)
      h = nn.RMSNorm()(x)
      x = x + nn.Dense(self.d, use_bias=False)(nn.silu(nn.Dense(self.mlp, use_bias=False)(h)))
    x = nn.RMSNorm()(x[:, prompt.shape[1] :])
    return nn.Dense(self.codebook, use_bias=False)(x).astype(jnp.float32)


def toy_policy(grid, codebook, prompt_len, key):
  model = ToyTransformer(vocab=64, codebook=codebook)
  n = grid[0] * grid[1]
  params = model.init(key, jnp.zeros((1, prompt_len), jnp.int32), jnp.full((1, n), MASK))["params"]
  fn = lambda p, prompt, canvas: model.apply({"params": p}, prompt, canvas)
  prompts = lambda b, rng: rng.integers(1, 64, (b, prompt_len)).astype(np.int32)
  uncond = lambda b: np.zeros((b, prompt_len), np.int32)
  return fn, params, n, prompts, uncond, "toy Linen transformer (d=128, 4 layers, 4 heads)", None


def llada_policy(grid, codebook, prompt_len, key, layers=None):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  from htgrpo_jax.models import llada, layouts, policy

  words = (
      "a an the red green blue yellow purple orange circle square triangle above below left "
      "right of and two three four photo"
  ).split()
  vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
  layout = layouts.EmbeddedLayout(tok, grid=grid, codebook_size=codebook, prompt_length=prompt_len)
  over = {}
  if layout.pad_id is not None:
    over = dict(use_pad_mask=True, pad_id=layout.pad_id)
  if layers:
    over["n_layers"] = layers
  # The position table must cover the sequence (larger grids than the ShapeEval 8 x 8).
  over["learned_pos_emb"] = max(llada.PRESETS["shapes"].learned_pos_emb, layout.seq_len)
  cfg = llada.get_config("shapes", **over)
  fn = policy.make_canvas_logits_fn(cfg, layout)
  cached = policy.make_cached_logits(cfg, layout)
  params = policy.init_params(cfg, layout, key)
  text = [" ".join(["a", "red", "circle", "above", "a", "blue", "square"])] * 1

  def prompts(b, rng):
    del rng
    return np.asarray(layout.encode_prompts(text * b), np.int32)

  uncond = lambda b: np.asarray(layout.unconditional_prompts(b), np.int32)
  desc = (
      f"htgrpo_jax.models LLaDA 'shapes' (d={cfg.d_model}, {cfg.n_layers} layers, "
      f"{cfg.n_heads} heads, seq {layout.seq_len})"
  )
  return fn, params, layout.num_image_tokens, prompts, uncond, desc, cached


def timed(fn, *args):
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="B=16, T=4, 3 repeats")
  ap.add_argument("--model", choices=("llada", "toy"), default="llada")
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--steps", type=int, default=12)
  ap.add_argument("--sketch-steps", type=int, default=4)
  ap.add_argument("--rule", default="maskgit")
  ap.add_argument("--cfg", type=float, default=1.0)
  ap.add_argument("--temperature", type=float, default=1.0)
  ap.add_argument("--temperature-mode", default="constant")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--spread", type=int, default=0, help="also time SamplerConfig.spread=R (maskgit), interleaved")
  ap.add_argument("--grid", type=int, default=8, help="image grid side: N = grid^2 tokens")
  ap.add_argument("--layers", type=int, default=None, help="LLaDA blocks (default: the preset's 4)")
  ap.add_argument(
      "--cache", action="store_true", help="time sample with and without the rollout cache, interleaved (LLaDA only)"
  )
  ap.add_argument("--cache-ratio", type=float, default=0.9)
  ap.add_argument("--cache-warmup", type=float, default=0.3)
  ap.add_argument("--cache-refresh", type=int, default=5)
  args = ap.parse_args(argv)
  if args.quick:
    args.batch, args.steps, args.sketch_steps, args.repeats = 16, 4, 2, 3

  grid, codebook, prompt_len = (args.grid, args.grid), 128, 16
  key = jax.random.key(0)
  if args.cache and args.model != "llada":
    ap.error("--cache needs --model=llada (the cache is a path of the LLaDA model)")
  if args.model == "llada":
    fn, params, n, prompts, uncond, desc, cached = llada_policy(grid, codebook, prompt_len, key, args.layers)
  else:
    fn, params, n, prompts, uncond, desc, cached = toy_policy(grid, codebook, prompt_len, key)
  if args.cache:
    return compare_cache(args, fn, cached, params, n, prompts, uncond, desc, codebook, key)

  cfg = SamplerConfig(
      num_steps=args.steps,
      sketch_steps=args.sketch_steps,
      rule=args.rule,
      cfg_scale=args.cfg,
      temperature=args.temperature,
      temperature_mode=args.temperature_mode,
  )
  sampler = make_sampler(fn, cfg, num_tokens=n)
  spread = make_sampler(fn, dataclasses.replace(cfg, spread=args.spread), num_tokens=n) if args.spread else None
  rng = np.random.default_rng(0)
  b = args.batch
  p, u = jnp.asarray(prompts(b, rng)), jnp.asarray(uncond(b))
  # A half-masked canvas: the forward's cost does not depend on the values.
  canvas = jnp.asarray(np.where(rng.random((b, n)) < 0.5, MASK, rng.integers(0, codebook, (b, n))), jnp.int32)
  forward = jax.jit(lambda prm, pt, ut, cv: guided_logits(fn, prm, pt, ut, cv, cfg.cfg_scale))
  sketch_paint = lambda prm, pt, ut, k: sampler.paint(prm, sampler.sketch(prm, pt, ut, k), k)

  @jax.jit
  def forward_loop(prm, pt, ut, cv):
    # T forwards in one compiled loop, each feeding the next (a value test XLA cannot fold), so
    # sample / forward_loop isolates the sampler's own per-step work from call overheads.
    def body(_, c):
      lg = guided_logits(fn, prm, pt, ut, c, cfg.cfg_scale)
      return jnp.where(lg[..., 0] > 1e30, 0, c)

    return jax.lax.fori_loop(0, args.steps, body, cv)

  t0 = time.perf_counter()
  jax.block_until_ready(forward(params, p, u, canvas))
  t_fwd_compile = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(sampler.sample(params, p, u, key))
  t_sample_compile = time.perf_counter() - t0
  jax.block_until_ready(sketch_paint(params, p, u, key))
  jax.block_until_ready(forward_loop(params, p, u, canvas))
  if spread:
    jax.block_until_ready(spread.sample(params, p, u, key))

  fwd_t, sample_t, sp_t, loop_t, spread_t = [], [], [], [], []
  for r in range(args.repeats):  # interleaved so load changes hit all four alike
    k = jax.random.fold_in(key, r)
    fwd_t.append(timed(forward, params, p, u, canvas))
    sample_t.append(timed(sampler.sample, params, p, u, k))
    sp_t.append(timed(sketch_paint, params, p, u, k))
    loop_t.append(timed(forward_loop, params, p, u, canvas))
    if spread:
      spread_t.append(timed(spread.sample, params, p, u, k))
  fwd, smp, sp, loop = (statistics.median(x) for x in (fwd_t, sample_t, sp_t, loop_t))
  rows = 2 * b if cfg.use_cfg else b
  print(f"model: {desc}")
  print(f"sampler: {cfg}")
  print(
      f"batch {b} images x {n} tokens, codebook {codebook}, forward batch {rows} rows; "
      f"backend {jax.default_backend()}, {jax.device_count()} device(s); repeats {args.repeats}"
  )
  print(f"compile: forward {t_fwd_compile:.2f} s, sample {t_sample_compile:.2f} s")
  print(f"one CFG forward (median): {fwd * 1e3:.1f} ms")
  print(f"sample (median): {smp:.3f} s = {b / smp:.1f} images/s")
  print(f"sketch+paint (median): {sp:.3f} s = {b / sp:.1f} images/s")
  print(f"overhead ratio sample / (T x forward) = {smp / (args.steps * fwd):.3f} (target <= 1.15)")
  print(f"overhead ratio sketch+paint / (T x forward) = {sp / (args.steps * fwd):.3f}")
  print(f"T forwards in one jitted loop (median): {loop:.3f} s; sample / loop = {smp / loop:.3f}")
  if spread:
    sp_med = statistics.median(spread_t)
    print(f"sample with spread={args.spread} (median): {sp_med:.3f} s; spread / plain = {sp_med / smp:.3f}")


def compare_cache(args, fn, cached_logits, params, n, prompts, uncond, desc, codebook, key):
  """Plain vs cached ``sample`` of the same config, timed interleaved; prints medians and ratio."""
  base = dict(
      num_steps=args.steps,
      sketch_steps=args.sketch_steps,
      rule=args.rule,
      cfg_scale=args.cfg,
      temperature=args.temperature,
      temperature_mode=args.temperature_mode,
  )
  cache = dict(
      enabled=True, ratio=args.cache_ratio, warmup_ratio=args.cache_warmup, refresh_interval=args.cache_refresh
  )
  plain_cfg, cached_cfg = SamplerConfig(**base), SamplerConfig(**base, cache=cache)
  plain = make_sampler(fn, plain_cfg, num_tokens=n)
  cached = make_sampler(fn, cached_cfg, num_tokens=n, cached_logits=cached_logits)
  rng = np.random.default_rng(0)
  b = args.batch
  p, u = jnp.asarray(prompts(b, rng)), jnp.asarray(uncond(b))
  compile_s = {}
  for name, smp in (("plain", plain), ("cached", cached)):
    t0 = time.perf_counter()
    jax.block_until_ready(smp.sample(params, p, u, key))
    compile_s[name] = time.perf_counter() - t0
  times = {"plain": [], "cached": []}
  same = []
  for r in range(args.repeats):  # interleaved (alternating which goes first) so load hits both alike
    k = jax.random.fold_in(key, r)
    order = ("plain", "cached") if r % 2 == 0 else ("cached", "plain")
    recs = {}
    for name in order:
      smp = plain if name == "plain" else cached
      t0 = time.perf_counter()
      recs[name] = jax.block_until_ready(smp.sample(params, p, u, k))
      times[name].append(time.perf_counter() - t0)
    same.append(float(np.mean(np.asarray(recs["plain"].image_tokens) == np.asarray(recs["cached"].image_tokens))))
  med = {name: statistics.median(t) for name, t in times.items()}
  seq = cached_logits.seq_len
  refresh = cached_cfg.cache.refresh_steps(args.steps, args.sketch_steps)
  print(f"model: {desc}")
  print(f"sampler: {plain_cfg}")
  print(
      f"cache: {cached_cfg.cache}: {int(refresh.sum())} of {args.steps} steps full, the others recompute "
      f"{cached_cfg.cache.num_recomputed(seq)} of {seq} positions"
  )
  print(
      f"batch {b} images x {n} tokens, codebook {codebook}, forward batch {2 * b if plain_cfg.use_cfg else b} "
      f"rows; backend {jax.default_backend()}, {jax.device_count()} device(s); repeats {args.repeats}"
  )
  print(f"compile (first call): plain {compile_s['plain']:.2f} s, cached {compile_s['cached']:.2f} s")
  for name in ("plain", "cached"):
    print(
        f"sample {name} (median): {med[name]:.3f} s = {b / med[name]:.1f} images/s "
        f"(all: {', '.join(f'{t:.3f}' for t in times[name])})"
    )
  print(f"speed-up plain / cached = {med['plain'] / med['cached']:.2f}x")
  print(f"tokens equal to the plain sampler's (same key): {statistics.mean(same):.3f}")


if __name__ == "__main__":
  main()
