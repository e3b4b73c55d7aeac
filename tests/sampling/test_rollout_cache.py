"""The samplers' rollout cache (``SamplerConfig.cache``, Lumina-DiMOO's ML-Cache) on a tiny LLaDA policy.

What a user relies on: the cache is off by default; with nothing stale (every step refreshed, or
every position recomputed) the cached sampler draws what the plain one draws; on its defaults it
changes the images only through stale keys/values, keeps the sampler's invariants (commit counts,
committed tokens frozen, ``paint(sketch) == sample``) and on a mesh draws what one device draws;
and a training config cannot turn it on for rollouts.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from htgrpo_jax import parallel, run_config
from htgrpo_jax.sampling import CacheConfig, SamplerConfig, make_sampler

N, B = 16, 4


@functools.lru_cache(maxsize=None)
def tiny_policy():
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  from htgrpo_jax.models import layouts, llada, policy

  vocab = {"[PAD]": 0, "[UNK]": 1, "red": 2, "circle": 3, "blue": 4, "square": 5, "a": 6}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
  layout = layouts.EmbeddedLayout(tok, grid=(4, 4), codebook_size=16, prompt_length=4)
  cfg = llada.get_config(
      "tiny",
      vocab_size=32,
      d_model=32,
      n_heads=4,
      mlp_hidden=64,
      init_std=0.2,
      use_pad_mask=True,
      pad_id=layout.pad_id,
      scan_layers=True,
  )
  params = policy.init_params(cfg, layout, jax.random.key(0))
  p = jnp.asarray(layout.encode_prompts(["a red circle", "blue square", "a blue circle", "red"]))
  u = jnp.asarray(layout.unconditional_prompts(B))
  return (policy.make_canvas_logits_fn(cfg, layout), policy.make_cached_logits(cfg, layout), params, p, u, layout)


def samplers(cache=None, mesh=None, **kw):
  fn, cached, *_ = tiny_policy()
  base = dict(num_steps=8, sketch_steps=3, rule="maskgit", cfg_scale=2.0, temperature=1.0)
  base.update(kw)
  plain = make_sampler(fn, SamplerConfig(**base), num_tokens=N, mesh=mesh)
  cached_s = make_sampler(fn, SamplerConfig(**base, cache=cache), num_tokens=N, mesh=mesh, cached_logits=cached)
  return plain, cached_s


def draw(s, key=jax.random.key(7)):
  _, _, params, p, u, _ = tiny_policy()
  return s.sample(params, p, u, key)


@pytest.mark.parametrize("rule", ["maskgit", "emerge"])
def test_refreshing_every_step_is_bit_identical_to_the_plain_sampler(rule):
  plain, cached = samplers(dict(enabled=True, warmup_ratio=0.0, refresh_interval=1), rule=rule)
  a, b = draw(plain), draw(cached)
  for f in ("image_tokens", "commit_step", "commit_entropy", "commit_logp"):
    np.testing.assert_array_equal(np.asarray(getattr(b, f)), np.asarray(getattr(a, f)), err_msg=f)


def test_recomputing_every_position_equals_the_plain_sampler_up_to_float_round_off():
  """ratio 0: the cached steps run the partial forward on all L positions (a permutation per row),
  so only the attention's operand order differs: same tokens, log-probs within 1e-5."""
  _, cached_fns, *_ = tiny_policy()
  assert CacheConfig(enabled=True, ratio=0.0).num_recomputed(cached_fns.seq_len) == cached_fns.seq_len
  plain, cached = samplers(dict(enabled=True, ratio=0.0))
  a, b = draw(plain), draw(cached)
  np.testing.assert_array_equal(np.asarray(b.image_tokens), np.asarray(a.image_tokens))
  np.testing.assert_array_equal(np.asarray(b.commit_step), np.asarray(a.commit_step))
  np.testing.assert_allclose(np.asarray(b.commit_logp), np.asarray(a.commit_logp), atol=1e-5)
  np.testing.assert_allclose(np.asarray(b.commit_entropy), np.asarray(a.commit_entropy), atol=1e-5)


def test_default_cache_changes_images_only_after_warmup_and_keeps_the_sampler_invariants():
  cfg = CacheConfig(enabled=True)  # ratio 0.9, warmup 0.3, refresh every 5
  plain, cached = samplers(cfg)
  _, _, params, p, u, _ = tiny_policy()
  key = jax.random.key(7)
  a, b = draw(plain, key), draw(cached, key)
  # Steps [0, int(8 * 0.3)] = [0, 2] are full forwards: what they commit is the plain sampler's.
  early_a, early_b = np.asarray(a.commit_step) <= 2, np.asarray(b.commit_step) <= 2
  np.testing.assert_array_equal(early_a, early_b)
  np.testing.assert_array_equal(np.asarray(a.image_tokens)[early_a], np.asarray(b.image_tokens)[early_b])
  # Stale keys/values on the cached steps change the draws.
  assert not np.array_equal(np.asarray(a.image_tokens), np.asarray(b.image_tokens))
  # MaskGIT's exact commit counts and a full canvas, as without the cache.
  masked_after = cached.config.masked_after(N)
  steps = np.asarray(b.commit_step)
  for s in range(8):
    assert ((steps <= s).sum(-1) == N - masked_after[s]).all()
  assert (np.asarray(b.image_tokens) >= 0).all() and (np.asarray(b.image_tokens) < 16).all()
  # paint(sketch(.)) draws what sample draws: the first paint step is a refresh in both.
  sp = cached.paint(params, cached.sketch(params, p, u, key), key)
  np.testing.assert_array_equal(np.asarray(sp.image_tokens), np.asarray(b.image_tokens))


def test_cache_schedule_and_recompute_count_follow_dimoo():
  c = CacheConfig(enabled=True)
  # Full steps: s <= int(T * 0.3) or (s - warmup) % 5 == 0, plus the first paint step.
  np.testing.assert_array_equal(np.flatnonzero(c.refresh_steps(12, 1)), [0, 1, 2, 3, 8])
  np.testing.assert_array_equal(np.flatnonzero(c.refresh_steps(12, 6)), [0, 1, 2, 3, 6, 8])
  assert CacheConfig().refresh_steps(12, 4).all()  # disabled: every step is full
  # DiMOO's conf <= quantile(conf, 1 - ratio): floor((1 - ratio) * (L - 1)) + 1 positions.
  assert c.num_recomputed(80) == 8 and c.num_recomputed(1) == 1
  assert CacheConfig(ratio=0.5).num_recomputed(11) == 6


@pytest.mark.slow
def test_cached_sampler_on_the_8_device_mesh_draws_what_one_device_draws():
  mesh = parallel.make_mesh(4, 2, 1)
  _, one = samplers(dict(enabled=True))
  _, eight = samplers(dict(enabled=True), mesh=mesh)
  _, _, params, p, u, _ = tiny_policy()
  p8, u8 = (jnp.concatenate([x, x]) for x in (p, u))  # 8 rows: one per device
  key = jax.random.key(3)
  a = one.sample(params, p8, u8, key)
  pb, ub = parallel.shard_batch((p8, u8), mesh)
  b = eight.sample(params, pb, ub, key)
  assert len(b.image_tokens.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(b.image_tokens), np.asarray(a.image_tokens))
  np.testing.assert_allclose(np.asarray(b.commit_logp), np.asarray(a.commit_logp), atol=1e-5)


def test_bad_cache_settings_raise_naming_the_key():
  for kw, key in (
      (dict(ratio=1.0), "cache.ratio"),
      (dict(ratio=-0.1), "cache.ratio"),
      (dict(warmup_ratio=1.5), "cache.warmup_ratio"),
      (dict(refresh_interval=0), "cache.refresh_interval"),
      (dict(refresh_interval=2.0), "cache.refresh_interval"),
      (dict(enabled="yes"), "cache.enabled"),
  ):
    with pytest.raises(ValueError, match=key):
      CacheConfig(**kw)
  with pytest.raises(ValueError, match="unknown keys \\['size'\\]"):
    SamplerConfig(cache=dict(enabled=True, size=3))
  assert SamplerConfig(cache=ml_collections.ConfigDict(dict(enabled=True))).cache == CacheConfig(enabled=True)
  fn, *_ = tiny_policy()
  with pytest.raises(ValueError, match="cached_logits"):
    make_sampler(fn, SamplerConfig(num_steps=4, sketch_steps=2, cache=dict(enabled=True)), num_tokens=N)
  assert not SamplerConfig().cache.enabled  # off by default


def _train_config(**sampler_cache):
  from htgrpo_jax.config_util import load_config_file
  import os

  c = load_config_file(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "geneval.py"), "tiny")
  for k, v in sampler_cache.items():
    c.eval.sampler_cache[k] = v
  return c


def test_plan_keeps_the_cache_off_training_rollouts():
  p = run_config.plan(_train_config())
  assert not p.sampler.cache.enabled and not p.rollout_sampler.cache.enabled
  p = run_config.plan(_train_config(enabled=True, ratio=0.8))
  assert p.sampler.cache == CacheConfig(enabled=True, ratio=0.8)  # evaluations use it
  assert not p.rollout_sampler.cache.enabled  # rollouts never do
  c = _train_config()
  c.sampler.cache = dict(enabled=True)
  with pytest.raises(ValueError, match="sampler.cache.enabled=True: training rollouts.*eval.sampler_cache"):
    run_config.plan(c)
  with pytest.raises(ValueError, match="eval.sampler_cache.refresh_interval"):
    run_config.plan(_train_config(refresh_interval=0))
  c = _train_config()
  c.eval.sampler_cache.bogus = 1
  with pytest.raises(ValueError, match="eval.sampler_cache: unknown keys \\['bogus'\\]"):
    run_config.plan(c)
