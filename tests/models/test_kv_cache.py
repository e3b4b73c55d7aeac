"""The LLaDA partial forward behind the sampler's rollout cache (``LLaDA(positions=, kv_cache=)``).

The one property the cache relies on: with keys and values that are fresh (computed from the same
tokens), the partial forward at any subset of positions gives the full forward's logits there, for
every layer layout, pad masking, LoRA adapters and compute dtype; stale keys and values are then the
only way a cached step can differ from the plain one.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htgrpo_jax.contracts import MASK, Adapted, CachedLogits
from htgrpo_jax.models import layouts, llada, lora, policy

TINY = llada.get_config("tiny", vocab_size=64, d_model=32, n_heads=4, mlp_hidden=48, init_std=0.2, learned_pos_emb=16)
HEAD = (8, 40)  # a codebook slice of the LM head, as the policy uses it


@functools.lru_cache(maxsize=None)
def _fns(cfg):
  m = llada.LLaDA(cfg)
  full = jax.jit(lambda p, t: m.apply({"params": p}, t, head_rows=HEAD, return_kv=True))
  plain = jax.jit(lambda p, t: m.apply({"params": p}, t, head_rows=HEAD))
  part = jax.jit(lambda p, t, pos, kv: m.apply({"params": p}, t, head_rows=HEAD, positions=pos, kv_cache=kv))
  return full, plain, part


def _setup(cfg, b=3, length=14, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(1, 64, (b, length)), jnp.int32)
  if cfg.use_pad_mask:
    tokens = tokens.at[:, :3].set(cfg.pad_id)  # left padding, masked keys
  params = llada.LLaDA(cfg).init(jax.random.key(seed), tokens)["params"]
  return rng, tokens, params


def _positions(rng, b, length, k):
  return jnp.asarray(np.stack([rng.permutation(length)[:k] for _ in range(b)]), jnp.int32)


@pytest.mark.parametrize(
    "over",
    [
        dict(),
        dict(scan_layers=True),
        dict(use_pad_mask=True, pad_id=0),
        dict(scan_layers=True, remat="full", use_pad_mask=True, pad_id=0),
    ],
    ids=["unrolled", "scan", "pad_mask", "scan_remat_pad"],
)
def test_partial_forward_with_a_fresh_cache_equals_the_full_forward(over):
  cfg = dataclasses.replace(TINY, **over)
  full, plain, part = _fns(cfg)
  rng, tokens, params = _setup(cfg)
  logits, kv = full(params, tokens)
  # return_kv changes nothing about the logits, and the cache has one K/V per layer and position.
  np.testing.assert_allclose(logits, plain(params, tokens), atol=1e-5)
  assert kv.k.shape == kv.v.shape == (cfg.n_layers, 3, 14, cfg.n_heads, cfg.head_dim)
  for k in (1, 5, 14):  # one position, a subset, and every position (in a random order per row)
    pos = _positions(rng, 3, 14, k)
    sub, kv2 = part(params, tokens, pos, kv)
    assert sub.shape == (3, k, HEAD[1]) and sub.dtype == jnp.float32
    np.testing.assert_allclose(sub, jnp.take_along_axis(logits, pos[..., None], 1), atol=1e-5)
    # Rewriting fresh K/V with what they already hold changes nothing.
    np.testing.assert_allclose(kv2.k, kv.k, atol=1e-5)
    np.testing.assert_allclose(kv2.v, kv.v, atol=1e-5)


def test_stale_cache_is_the_only_difference_and_a_full_recompute_removes_it():
  """Tokens change at some positions after the cache was filled: recomputing a subset reads the
  stale K/V of the rest (logits differ from a fresh forward), recomputing every position does not."""
  full, _, part = _fns(TINY)
  rng, tokens, params = _setup(TINY)
  _, stale = full(params, tokens)
  new = tokens.at[:, 8:].set((tokens[:, 8:] + 7) % 64)
  fresh_logits, fresh_kv = full(params, new)
  pos = jnp.tile(jnp.arange(8, 14, dtype=jnp.int32)[None], (3, 1))  # exactly the changed ones
  sub, _ = part(params, new, pos, stale)
  want = jnp.take_along_axis(fresh_logits, pos[..., None], 1)
  assert float(jnp.max(jnp.abs(sub - want))) > 1e-3  # layer >= 2 keys of unchanged positions are stale
  every = _positions(rng, 3, 14, 14)
  sub, kv = part(params, new, every, stale)
  np.testing.assert_allclose(sub, jnp.take_along_axis(fresh_logits, every[..., None], 1), atol=1e-5)
  np.testing.assert_allclose(kv.k, fresh_kv.k, atol=1e-5)


def test_partial_forward_under_bf16_compute_and_cache():
  cfg = dataclasses.replace(TINY, dtype=jnp.bfloat16, scan_layers=True)
  full, _, part = _fns(cfg)
  rng, tokens, params = _setup(cfg)
  logits, kv = full(params, tokens)
  assert kv.k.dtype == kv.v.dtype == jnp.bfloat16  # the cache is held in the compute dtype
  pos = _positions(rng, 3, 14, 5)
  sub, _ = part(params, tokens, pos, kv)
  assert sub.dtype == jnp.float32
  want = jnp.take_along_axis(logits, pos[..., None], 1)
  # bf16 round-off only (different matmul shapes): far below the logits' own scale.
  assert float(jnp.max(jnp.abs(sub - want))) < 0.05 * float(jnp.max(jnp.abs(want)))


def test_partial_forward_errors_name_the_argument():
  full, _, part = _fns(TINY)
  _, tokens, params = _setup(TINY)
  _, kv = full(params, tokens)
  m = llada.LLaDA(TINY)
  pos = jnp.zeros((3, 2), jnp.int32)
  with pytest.raises(ValueError, match="needs kv_cache"):
    m.apply({"params": params}, tokens, positions=pos)
  with pytest.raises(ValueError, match="no select"):
    m.apply({"params": params}, tokens, positions=pos, kv_cache=kv, select=np.arange(3))
  with pytest.raises(ValueError, match="positions must be int\\[B=3"):
    m.apply({"params": params}, tokens, positions=pos[:2], kv_cache=kv)
  with pytest.raises(ValueError, match="kv_cache k/v shapes"):
    m.apply({"params": params}, tokens[:, 1:], positions=pos, kv_cache=kv)
  with pytest.raises(ValueError, match="only read by a partial forward"):
    m.apply({"params": params}, tokens, kv_cache=kv)


@pytest.fixture(scope="module")
def embedded(word_tokenizer_dir):
  lay = layouts.EmbeddedLayout(word_tokenizer_dir, grid=(2, 4), codebook_size=16, prompt_length=5)
  cfg = llada.get_config(
      "tiny",
      vocab_size=lay.vocab_size,
      d_model=32,
      n_heads=4,
      mlp_hidden=64,
      use_pad_mask=True,
      pad_id=lay.pad_id,
      learned_pos_emb=16,
      init_std=0.2,
      scan_layers=True,
  )
  return lay, cfg


@pytest.mark.parametrize("adapters", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["base", "lora"])
def test_cached_logits_of_the_policy_match_its_canvas_logits(embedded, adapters):
  """``policy.make_cached_logits``: full logits at the slots = the CanvasLogitsFn's, pads are not
  selectable, and the partial forward reads the same params (LoRA adapters included)."""
  lay, cfg = embedded
  params = policy.init_params(cfg, lay, jax.random.key(0))
  if adapters:
    cfg = dataclasses.replace(cfg, lora=lora.LoraConfig(rank=2, alpha=4.0))
    ad = policy.init_adapters(cfg, lay, jax.random.key(1))
    # B starts at zero (the base policy); random B makes the adapters change the logits.
    ad = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            0.3 * jax.random.normal(jax.random.key(2), x.shape, x.dtype) if str(path[-1].key).endswith("_b") else x
        ),
        ad,
    )
    params = Adapted(params, ad)
  cl = policy.make_cached_logits(cfg, lay)
  assert isinstance(cl, CachedLogits) and cl.seq_len == lay.seq_len
  np.testing.assert_array_equal(cl.image_positions, lay.image_positions)
  prompts = jnp.asarray(lay.encode_prompts(["a red circle", "two blue square"]))
  canvas = jnp.asarray([[MASK] * 8, [1, 2, 3, MASK, 5, 6, 7, 0]], jnp.int32)
  logits, kv = jax.jit(cl.full)(params, prompts, canvas)
  want = policy.make_canvas_logits_fn(cfg, lay)(params, prompts, canvas)
  np.testing.assert_allclose(logits[:, lay.image_positions], want, atol=1e-5)
  if adapters:  # the adapters are applied (the base policy's logits differ)
    base = policy.make_canvas_logits_fn(cfg, lay)(params.base, prompts, canvas)
    assert float(jnp.max(jnp.abs(base - want))) > 1e-3
  pos = jnp.asarray([[12, 5, 7], [3, 9, 11]], jnp.int32)
  sub, _ = jax.jit(cl.partial)(params, prompts, canvas, pos, kv)
  np.testing.assert_allclose(sub, jnp.take_along_axis(logits, pos[..., None], 1), atol=1e-5)
  sel = np.asarray(cl.selectable(prompts))
  np.testing.assert_array_equal(sel[:, : lay.prompt_length], np.asarray(prompts) != lay.pad_id)
  assert sel[:, lay.prompt_length :].all()
