"""Sketch/paint samplers: commit counts, known distributions with and without CFG, the trajectory
record, sketch/paint/sample agreement, branching, and 1-device vs 8-device agreement.

Two toy policies with known behaviour stand in for the model:
  * ``table_fn``: logits depend only on the prompt id (a fixed table), so the sampling
    distribution, CFG'd and tempered, is known in closed form;
  * ``canvas_fn``: adds a term that depends on the committed tokens (left neighbour and canvas
    mean), so replaying the trajectory really needs the recorded canvases.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from htgrpo_jax import parallel
from htgrpo_jax.contracts import MASK
from htgrpo_jax.sampling import (
    CanvasState,
    SampleRecord,
    SamplerConfig,
    make_sampler,
    replay_commit_stats,
    trajectory_canvas,
)

C = 6  # codebook
NUM_PROMPTS = 4  # prompt id 0 is the unconditional prompt
D = 5


def make_params(seed=0, n=16):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {
      "tab": 1.5 * jax.random.normal(k1, (NUM_PROMPTS, n, C)),
      "emb": jax.random.normal(k2, (C + 1, D)),
      "w": 0.7 * jax.random.normal(k3, (D, C)),
  }


def table_fn(params, prompt_tokens, canvas):
  del canvas
  return params["tab"][prompt_tokens[:, 0]]


def canvas_fn(params, prompt_tokens, canvas):
  e = params["emb"][canvas + 1]  # MASK (-1) -> row 0
  left = jnp.pad(e, ((0, 0), (1, 0), (0, 0)))[:, :-1]  # left neighbour's embedding
  h = left + e.mean(axis=1, keepdims=True)
  return params["tab"][prompt_tokens[:, 0]] + h @ params["w"]


def prompts(b, lp=3):
  ids = 1 + np.arange(b) % (NUM_PROMPTS - 1)
  return jnp.asarray(np.repeat(ids[:, None], lp, 1), jnp.int32), jnp.zeros((b, lp), jnp.int32)


@functools.lru_cache(maxsize=None)
def sampler_for(fn, n, mesh_shape=None, **cfg):
  mesh = parallel.make_mesh(*mesh_shape) if mesh_shape else None
  return make_sampler(fn, SamplerConfig(**cfg), num_tokens=n, mesh=mesh)


# The shared sampler most tests use (compiles once per entry point for the whole module).
SHARED_N, SHARED_B = 16, 8
SHARED = dict(num_steps=5, sketch_steps=2, rule="maskgit", cfg_scale=1.5, temperature=0.8, temperature_mode="constant")
EMERGE = dict(
    num_steps=5, sketch_steps=2, rule="emerge", cfg_scale=0.0, temperature=1.0, temperature_mode="mmada_annealed"
)


@functools.lru_cache(maxsize=None)
def replay_for(fn, **cfg):
  return jax.jit(functools.partial(replay_commit_stats, fn, SamplerConfig(**cfg)))


def analytic_logq(params, prompt_ids, cfg_scale, temperature):
  """float64[B, N, C] log of softmax(((1+s) cond - s uncond) / temperature)."""
  tab = np.asarray(params["tab"], np.float64)
  logits = (1 + cfg_scale) * tab[prompt_ids] - cfg_scale * tab[0][None]
  return special.log_softmax(logits / temperature, axis=-1)


# ---- commit counts and frozen tokens ---------------------------------------------------------


def test_maskgit_commits_exact_counts_and_never_changes_committed_tokens():
  n, b, t = SHARED_N, SHARED_B, SHARED["num_steps"]
  s = sampler_for(canvas_fn, n, **SHARED)
  params, (p, u), key = make_params(n=n), prompts(b), jax.random.key(3)
  st = s.sketch(params, p, u, key)
  rec = s.paint(params, st, key)
  m = SamplerConfig(**SHARED).masked_after(n)
  np.testing.assert_array_equal(m, [15, 12, 9, 4, 0])  # floor(16 cos(pi/2 (s+1)/5))
  commit_step = np.asarray(rec.commit_step)
  per_step = np.stack([(commit_step == i).sum(1) for i in range(t)], 1)
  np.testing.assert_array_equal(per_step, np.broadcast_to(-np.diff(np.r_[n, m]), (b, t)))
  # The sketch state holds exactly the first 2 steps' commits, unchanged in the final images.
  canvas, sk_step = np.asarray(st.canvas), np.asarray(st.commit_step)
  assert int(st.step) == 2
  np.testing.assert_array_equal(canvas == MASK, sk_step == -1)
  np.testing.assert_array_equal((canvas != MASK).sum(1), n - m[1])
  done = canvas != MASK
  np.testing.assert_array_equal(np.asarray(rec.image_tokens)[done], canvas[done])
  np.testing.assert_array_equal(commit_step[done], sk_step[done])
  np.testing.assert_array_equal(np.asarray(rec.commit_logp)[done], np.asarray(st.commit_logp)[done])
  assert np.all(commit_step[~done] >= 2)
  img = np.asarray(rec.image_tokens)
  assert img.dtype == np.int32 and img.min() >= 0 and img.max() < C


def test_maskgit_commits_the_most_confident_first_without_noise():
  # Annealed mode with temperature 0: no remasking noise, so the near-certain slots (one logit far
  # above the rest) must be exactly the first step's commits; the others are uniform over C.
  n, b, t = 16, 2, 4
  kw = dict(num_steps=t, sketch_steps=1, rule="maskgit", temperature=0.0, temperature_mode="mmada_annealed")
  first = n - SamplerConfig(**kw).masked_after(n)[0]  # floor(16 cos(pi/8)) = 14 -> 2 commits
  assert first == 2
  certain = [5, 11]
  sure = np.zeros((NUM_PROMPTS, n, C), np.float32)
  sure[:, certain, 2] = 30.0
  rec = sampler_for(table_fn, n, **kw).sample({"tab": jnp.asarray(sure)}, *prompts(b), jax.random.key(0))
  step0 = np.asarray(rec.commit_step) == 0
  np.testing.assert_array_equal(np.nonzero(step0)[1], certain * b)
  np.testing.assert_array_equal(np.asarray(rec.image_tokens)[:, certain], 2)


def _neighbours_committed_together(commit_step, width, radius=1):
  """Per row: how many pairs of slots within Chebyshev distance ``radius`` committed in one step."""
  n = commit_step.shape[1]
  r, c = np.divmod(np.arange(n), width)
  near = (np.abs(r[:, None] - r[None]) <= radius) & (np.abs(c[:, None] - c[None]) <= radius) & ~np.eye(n, dtype=bool)
  same = commit_step[:, :, None] == commit_step[:, None, :]
  return (same & near[None]).sum((1, 2)) // 2


def test_spread_keeps_maskgits_counts_and_commits_no_neighbours_together_while_far_slots_remain():
  # 8 x 8 grid, 12 steps: every step commits at most 9 slots, and a 3 x 3 exclusion around each leaves
  # a far slot for every one of them in the early steps, so those steps hold no neighbouring pair.
  n, b, t = 64, 8, 12
  kw = dict(num_steps=t, sketch_steps=6, rule="maskgit", temperature=1.0, temperature_mode="constant")
  params, (p, u), key = make_params(n=n), prompts(b), jax.random.key(1)
  plain = sampler_for(canvas_fn, n, **kw).sample(params, p, u, key)
  spread = sampler_for(canvas_fn, n, **kw, spread=1).sample(params, p, u, key)
  m = SamplerConfig(**kw).masked_after(n)
  for rec in (plain, spread):
    cs = np.asarray(rec.commit_step)
    per_step = np.stack([(cs == i).sum(1) for i in range(t)], 1)
    np.testing.assert_array_equal(per_step, np.broadcast_to(-np.diff(np.r_[n, m]), (b, t)))
  cs_plain, cs_spread = np.asarray(plain.commit_step), np.asarray(spread.commit_step)
  early = lambda cs: np.where(cs < 6, cs, -np.arange(n)[None] - 1)  # later steps made distinct
  assert np.all(_neighbours_committed_together(early(cs_spread), 8) == 0)
  assert _neighbours_committed_together(early(cs_plain), 8).sum() > 0  # plain MaskGIT does commit some
  # The first step has no earlier choice to avoid: both pick the same most confident slot(s).
  np.testing.assert_array_equal(cs_plain == 0, cs_spread == 0)


def test_spread_without_a_neighbour_is_maskgits_top_k():
  from htgrpo_jax.sampling import sampler as S

  score = jnp.asarray([[5.0, 1.0, 4.0, 0.0, 3.0, 2.0, -1.0, 0.5, 0.2]])  # a 3 x 3 grid
  masked = jnp.ones((1, 9), bool)
  top2 = np.asarray(S._spread_commit(score, masked, jnp.asarray([2]), 3, 1))[0]
  np.testing.assert_array_equal(np.nonzero(top2)[0], [0, 2])  # 0 and 2 are two apart: no conflict
  # 0 and 2 block 1, 3, 4 and 5 (radius 1): the third pick skips 4 (3.0) and 5 (2.0) for 7 (0.5),
  # the best of the bottom row ...
  top3 = np.asarray(S._spread_commit(score, masked, jnp.asarray([3]), 3, 1))[0]
  np.testing.assert_array_equal(np.nonzero(top3)[0], [0, 2, 7])
  # ... and when only near slots are left they still fill the count, best first.
  all9 = np.asarray(S._spread_commit(score, masked, jnp.asarray([9]), 3, 1))[0]
  assert all9.all()
  committed = masked.at[0, 0].set(False)
  two = np.asarray(S._spread_commit(score, committed, jnp.asarray([2]), 3, 1))[0]
  assert not two[0] and two.sum() == 2


def test_spread_config_is_checked_by_name():
  with pytest.raises(ValueError, match="SamplerConfig.spread: must be >= 0"):
    SamplerConfig(spread=-1)
  with pytest.raises(ValueError, match="SamplerConfig.spread: spreads MaskGIT's commits; rule='emerge'"):
    SamplerConfig(rule="emerge", spread=1)
  with pytest.raises(ValueError, match="SamplerConfig.spread: needs a square token grid, got num_tokens=12"):
    make_sampler(table_fn, SamplerConfig(spread=1), num_tokens=12)


def test_emerge_commits_each_masked_token_with_the_schedule_probability():
  n, b, t = 256, 16, 5
  cfg = dict(num_steps=t, sketch_steps=2, rule="emerge", temperature_mode="constant")
  rec = sampler_for(table_fn, n, **cfg).sample(make_params(n=n), *prompts(b), jax.random.key(7))
  probs = SamplerConfig(**cfg).unmask_probs()
  wrong = SamplerConfig(**dict(cfg, schedule="linear")).unmask_probs()
  commit_step = np.asarray(rec.commit_step)
  remaining = b * n
  for step in range(t):
    k = int((commit_step == step).sum())
    if step < t - 1:
      # Fixed seed: deterministic, and a wrong probability would sit far outside these bounds.
      assert stats.binomtest(k, remaining, probs[step]).pvalue > 1e-3, (step, k, remaining)
      # ... and the test has power: another schedule's clearly different probability is rejected.
      if abs(wrong[step] - probs[step]) > 0.05:
        assert stats.binomtest(k, remaining, wrong[step]).pvalue < 1e-3, (step, k, wrong[step])
    else:
      assert k == remaining  # the last step fills everything
    remaining -= k
  assert remaining == 0


# ---- known distributions, CFG ----------------------------------------------------------------


@pytest.mark.parametrize(
    "rule, t, cfg_scale, temperature, mode",
    [
        ("maskgit", 1, 0.0, 0.7, "constant"),
        ("maskgit", 1, 2.0, 0.7, "constant"),
        ("emerge", 3, 1.5, 5.0, "mmada_annealed"),  # temperature must not touch the distribution
    ],
)
def test_sampled_frequencies_match_the_guided_distribution(rule, t, cfg_scale, temperature, mode):
  n, b = 64, 24
  params = make_params(seed=1, n=n)
  # Position-independent logits per prompt so each row's N draws share one distribution.
  params["tab"] = jnp.broadcast_to(params["tab"][:, :1], params["tab"].shape)
  p, u = prompts(b)
  s = sampler_for(
      table_fn,
      n,
      num_steps=t,
      sketch_steps=1,
      rule=rule,
      cfg_scale=cfg_scale,
      temperature=temperature,
      temperature_mode=mode,
  )
  rec = s.sample(params, p, u, jax.random.key(11))
  temp = temperature if mode == "constant" else 1.0
  ids = np.asarray(p[:, 0])
  logq = np.asarray(analytic_logq(params, ids, cfg_scale, temp))
  naive = np.asarray(analytic_logq(params, ids, 0.0, 1.0))  # unguided, untempered: wrong here
  img = np.asarray(rec.image_tokens)
  naive_p = []
  for pid in np.unique(ids):
    rows = ids == pid
    counts = np.bincount(img[rows].ravel(), minlength=C)
    expected = np.exp(logq[rows][0, 0]) * counts.sum()
    assert stats.chisquare(counts, expected).pvalue > 1e-3, (pid, counts, expected)
    naive_p.append(stats.chisquare(counts, np.exp(naive[rows][0, 0]) * counts.sum()).pvalue)
  assert min(naive_p) < 1e-3, naive_p  # the test can tell the guided distribution apart
  # The record is exactly the analytic distribution each token was drawn from (per row, so a
  # cond/uncond row mix-up in the 2B batch would show).
  want_lp = np.take_along_axis(logq, img[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(rec.commit_logp), want_lp, atol=1e-4)
  want_ent = -(np.exp(logq) * logq).sum(-1)
  np.testing.assert_allclose(np.asarray(rec.commit_entropy), want_ent, atol=1e-4)


def test_zero_probability_codes_are_never_drawn():
  # -inf logits (e.g. a model that bans codes) give q = 0: never sampled, finite entropy/log-prob.
  n, b = 64, 8
  tab = np.full((NUM_PROMPTS, n, C), -np.inf, np.float32)
  tab[:, :, 3] = 0.0
  tab[:, ::2, 5] = 1.0
  s = sampler_for(table_fn, n, num_steps=2, sketch_steps=1, rule="maskgit", temperature=0.5)
  rec = s.sample({"tab": jnp.asarray(tab)}, *prompts(b), jax.random.key(1))
  img = np.asarray(rec.image_tokens)
  assert set(np.unique(img[:, 1::2])) == {3}
  assert set(np.unique(img[:, ::2])) == {3, 5}
  assert np.isfinite(np.asarray(rec.commit_entropy)).all()
  assert np.isfinite(np.asarray(rec.commit_logp)).all()
  np.testing.assert_allclose(np.asarray(rec.commit_logp)[:, 1::2], 0.0, atol=1e-6)


def test_cfg_scale_zero_equals_the_conditional_sampler():
  n, b = SHARED_N, SHARED_B
  params, (p, u), key = make_params(n=n), prompts(b), jax.random.key(5)
  plain = sampler_for(canvas_fn, n, **dict(SHARED, cfg_scale=0.0))
  # With the unconditional prompt equal to the conditional one, (1+s)c - s c = c: same draws.
  guided = sampler_for(canvas_fn, n, **SHARED)
  a = plain.sample(params, p, u, key)
  b_ = guided.sample(params, p, p, key)
  np.testing.assert_array_equal(np.asarray(a.image_tokens), np.asarray(b_.image_tokens))
  np.testing.assert_array_equal(np.asarray(a.commit_step), np.asarray(b_.commit_step))
  np.testing.assert_allclose(np.asarray(a.commit_logp), np.asarray(b_.commit_logp), atol=1e-4)
  # ... and a real unconditional prompt changes them.
  c = guided.sample(params, p, u, key)
  assert (np.asarray(c.image_tokens) != np.asarray(a.image_tokens)).any()
  # cfg 0 never reads the unconditional prompt, which may then be omitted.
  d = plain.sample(params, p, None, key)
  np.testing.assert_array_equal(np.asarray(a.image_tokens), np.asarray(d.image_tokens))


# ---- trajectory record, sketch/paint/sample, branch -------------------------------------------


def test_paint_of_sketch_equals_sample():
  s = sampler_for(canvas_fn, SHARED_N, **SHARED)
  params, (p, u), key = make_params(n=SHARED_N), prompts(SHARED_B), jax.random.key(9)
  rec = s.paint(params, s.sketch(params, p, u, key), key)
  full = s.sample(params, p, u, key)
  for f in ("image_tokens", "commit_step"):
    np.testing.assert_array_equal(np.asarray(getattr(rec, f)), np.asarray(getattr(full, f)))
  for f in ("commit_entropy", "commit_logp"):
    np.testing.assert_allclose(np.asarray(getattr(rec, f)), np.asarray(getattr(full, f)), atol=1e-6)
  # Different keys give different images.
  other = s.sample(params, p, u, jax.random.key(10))
  assert (np.asarray(other.image_tokens) != np.asarray(full.image_tokens)).any()


@pytest.mark.parametrize("kw", [SHARED, EMERGE], ids=["maskgit_cfg", "emerge"])
def test_record_matches_replay_from_the_recorded_canvases(kw):
  n = SHARED_N
  s = sampler_for(canvas_fn, n, **kw)
  params, (p, u), key = make_params(n=n), prompts(SHARED_B), jax.random.key(9)
  rec = s.sample(params, p, u, key)
  t = kw["num_steps"]
  assert np.asarray(rec.commit_step).min() >= 0 and np.asarray(rec.commit_step).max() < t
  # Replay: rebuild each step's canvas from the record and re-run the guided logits.
  replay = replay_for(canvas_fn, **kw)
  ent, lp = replay(params, p, u, rec.image_tokens, rec.commit_step)
  np.testing.assert_allclose(np.asarray(ent), np.asarray(rec.commit_entropy), atol=1e-5)
  np.testing.assert_allclose(np.asarray(lp), np.asarray(rec.commit_logp), atol=1e-5)
  assert np.all(np.asarray(rec.commit_logp) <= 0) and np.all(np.asarray(rec.commit_entropy) >= 0)
  # A wrong trajectory is detected: the replay depends on the canvases it rebuilds.
  shifted = jnp.maximum(rec.commit_step - 1, 0)
  _, lp_bad = replay(params, p, u, rec.image_tokens, shifted)
  assert not np.allclose(np.asarray(lp_bad), np.asarray(rec.commit_logp), atol=1e-3)


def test_trajectory_canvas():
  img = jnp.array([[3, 1, 4]], jnp.int32)
  step = jnp.array([[2, 0, 1]], jnp.int32)
  np.testing.assert_array_equal(trajectory_canvas(img, step, 0), [[MASK, MASK, MASK]])
  np.testing.assert_array_equal(trajectory_canvas(img, step, 2), [[MASK, 1, 4]])
  np.testing.assert_array_equal(trajectory_canvas(img, step, 3), [[3, 1, 4]])


def test_branch_repeats_sketches_contiguously_and_paints_diverge():
  n, b, g = SHARED_N, SHARED_B, 3
  s = sampler_for(canvas_fn, n, **SHARED)
  params, (p, u), key = make_params(n=n), prompts(b), jax.random.key(2)
  st = s.sketch(params, p, u, key)
  br = s.branch(st, g)
  assert isinstance(br, CanvasState) and br.canvas.shape == (b * g, n)
  for f in ("canvas", "commit_step", "commit_entropy", "commit_logp", "prompt_tokens", "uncond_tokens"):
    np.testing.assert_array_equal(np.asarray(getattr(br, f)), np.repeat(np.asarray(getattr(st, f)), g, axis=0))
  assert int(br.step) == 2
  rec = s.paint(params, br, key)
  assert isinstance(rec, SampleRecord) and rec.image_tokens.shape == (b * g, n)
  img = np.asarray(rec.image_tokens).reshape(b, g, n)
  sketched = np.asarray(st.canvas) != MASK
  for i in range(b):  # the group shares the sketch ...
    for j in range(g):
      np.testing.assert_array_equal(img[i, j][sketched[i]], np.asarray(st.canvas)[i][sketched[i]])
    assert len({tuple(r) for r in img[i]}) > 1  # ... and paints differently
  roll = rec.to_rollout(br.prompt_tokens, jnp.zeros((b * g,), jnp.float32))
  roll.validate()


# ---- sharding ----------------------------------------------------------------------------------


def test_same_key_same_images_on_one_device_and_on_the_8_device_mesh():
  n, b = SHARED_N, SHARED_B
  one = sampler_for(canvas_fn, n, **SHARED)
  eight = sampler_for(canvas_fn, n, mesh_shape=(4, 2, 1), **SHARED)
  params, (p, u), key = make_params(n=n), prompts(b), jax.random.key(4)
  a = one.sample(params, p, u, key)
  mesh = parallel.make_mesh(4, 2, 1)  # an Explicit-axis mesh, as parallel.make_mesh builds it
  pb, ub = parallel.shard_batch((p, u), mesh)
  st = eight.sketch(params, pb, ub, key)
  assert len(st.canvas.sharding.device_set) == 8
  bb = eight.paint(params, st, key)
  assert bb.image_tokens.sharding.spec == jax.sharding.PartitionSpec(parallel.BATCH_AXES, None)
  assert len(bb.image_tokens.sharding.device_set) == 8
  for f in ("image_tokens", "commit_step"):
    np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(bb, f)))
  for f in ("commit_entropy", "commit_logp"):
    np.testing.assert_allclose(np.asarray(getattr(a, f)), np.asarray(getattr(bb, f)), atol=1e-5)


# ---- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_raise_naming_the_argument():
  n = SHARED_N
  s = sampler_for(canvas_fn, n, **SHARED)
  params, (p, u), key = make_params(n=n), prompts(4), jax.random.key(0)
  with pytest.raises(ValueError, match="uncond_tokens"):
    s.sample(params, p, None, key)  # CFG needs the unconditional prompt
  with pytest.raises(ValueError, match="uncond_tokens"):
    s.sketch(params, p, u[:, :2], key)
  with pytest.raises(ValueError, match="prompt_tokens"):
    s.sample(params, p[:, 0], u, key)
  with pytest.raises(ValueError, match="prompt_tokens"):
    s.sample(params, p.astype(jnp.float32), u, key)
  with pytest.raises(ValueError, match="num_tokens"):
    make_sampler(canvas_fn, SamplerConfig(), num_tokens=0)
  with pytest.raises(ValueError, match="config"):
    make_sampler(canvas_fn, dict(num_steps=4), num_tokens=n)
  with pytest.raises(ValueError, match="g: group size"):
    s.branch(CanvasState(*(jnp.zeros((4, n), jnp.int32) for _ in range(4)), jnp.int32(2), p, u), 0)
  with pytest.raises(ValueError, match="state.canvas"):
    s.paint(params, CanvasState(*(jnp.zeros((4, n + 1), jnp.int32) for _ in range(4)), jnp.int32(2), p, u), key)
  eight = sampler_for(canvas_fn, n, mesh_shape=(4, 2, 1), **SHARED)
  with pytest.raises(ValueError, match="multiple of data\\*fsdp = 8"):
    eight.sample(params, *prompts(4), key)


# ---- the real policy on a 3-axis mesh (slow: compiles a transformer twice) -------------------------


@pytest.mark.slow
def test_llada_policy_sharded_params_match_single_device():
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  from htgrpo_jax.models import layouts, llada, policy

  vocab = {"[PAD]": 0, "[UNK]": 1, "red": 2, "circle": 3, "blue": 4, "square": 5}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
  layout = layouts.EmbeddedLayout(tok, grid=(4, 4), codebook_size=16, prompt_length=4)
  cfg = llada.get_config(
      "tiny", vocab_size=64, d_model=32, n_heads=4, mlp_hidden=64, use_pad_mask=True, pad_id=layout.pad_id
  )
  fn = policy.make_canvas_logits_fn(cfg, layout)
  b = 8
  p = jnp.asarray(layout.encode_prompts(["red circle", "blue square"] * (b // 2)))
  u = jnp.asarray(layout.unconditional_prompts(b))
  kw = SamplerConfig(num_steps=4, sketch_steps=2, rule="maskgit", cfg_scale=2.0, temperature=0.9)
  key = jax.random.key(1)
  one = make_sampler(fn, kw, num_tokens=16).sample(policy.init_params(cfg, layout, jax.random.key(0)), p, u, key)
  mesh = parallel.make_mesh(2, 2, 2)
  params = policy.init_params(cfg, layout, jax.random.key(0), mesh=mesh)
  s = make_sampler(fn, kw, num_tokens=16, mesh=mesh)
  pb, ub = parallel.shard_batch((p, u), mesh)
  rec = s.paint(params, s.branch(s.sketch(params, pb, ub, key), 1), key)
  np.testing.assert_array_equal(np.asarray(rec.image_tokens), np.asarray(one.image_tokens))
  np.testing.assert_array_equal(np.asarray(rec.commit_step), np.asarray(one.commit_step))
  np.testing.assert_allclose(np.asarray(rec.commit_logp), np.asarray(one.commit_logp), atol=1e-4)
