"""rl building blocks against independent NumPy references (hypothesis), plus their invariants."""

import functools
import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from htgrpo_jax import rl
from htgrpo_jax.rl import MASK
from tests.helpers.rl_reference import rollout_record
from tests.helpers.rl_reference import np_credit, np_group_advantages, np_loss, np_partition

# A few shapes only: every new shape compiles, and the profile runs 20 examples per test.
shape = st.sampled_from([(1, 5), (3, 8), (2, 13)])


# ----------------------------------------------------------------------------- advantages
@given(st.integers(2, 5), st.integers(1, 4), st.integers(0, 1), st.integers(0, 2**31 - 1))
def test_group_advantages_matches_numpy(g, n_groups, ddof, seed):
  rng = np.random.default_rng(seed)
  r = rng.normal(size=g * n_groups).astype(np.float32)
  if seed % 3 == 0:
    r[:g] = 0.5  # a constant group -> zero advantage
  got = rl.group_advantages(jnp.asarray(r), g, 1e-5, ddof)
  np.testing.assert_allclose(np.asarray(got), np_group_advantages(r, g, 1e-5, ddof), rtol=2e-5, atol=2e-5)
  if seed % 3 == 0:
    assert np.all(np.asarray(got)[:g] == 0)


def test_group_advantages_rejects_bad_batch():
  with pytest.raises(ValueError, match="group_size"):
    rl.group_advantages(jnp.zeros(6), 4)


# ----------------------------------------------------------------------------- partition & credit
_partition = jax.jit(rl.partition_tokens, static_argnames=("num_steps", "sketch_fraction", "structure_ratio", "mode"))
_update_set = jax.jit(rl.sample_update_set)


@given(
    shape,
    st.integers(1, 8),
    st.sampled_from([0.25, 0.5, 1.0]),
    st.sampled_from([0.1, 0.3, 1.0]),
    st.sampled_from(["entropy", "step"]),
    st.integers(0, 2**31 - 1),
)
def test_partition_matches_numpy(bn, t, sf, sr, mode, seed):
  b, n = bn
  rng = np.random.default_rng(seed)
  step = rng.integers(0, t, (b, n)).astype(np.int32)
  ent = rng.integers(0, 4, (b, n)).astype(np.float32) * 0.5  # few distinct values: many ties
  got = _partition(jnp.asarray(step), jnp.asarray(ent), num_steps=t, sketch_fraction=sf, structure_ratio=sr, mode=mode)
  np.testing.assert_array_equal(np.asarray(got), np_partition(step, ent, t, sf, sr, mode))


def test_partition_random_mode_is_keyed_and_inside_candidates():
  rng = np.random.default_rng(0)
  step = jnp.asarray(rng.integers(0, 4, (3, 20)), jnp.int32)
  ent = jnp.zeros((3, 20))
  kw = dict(num_steps=4, sketch_fraction=0.5, structure_ratio=0.2, mode="random")
  a = rl.partition_tokens(step, ent, key=jax.random.key(1), **kw)
  b = rl.partition_tokens(step, ent, key=jax.random.key(1), **kw)
  np.testing.assert_array_equal(a, b)
  assert not np.any(np.asarray(a) & (np.asarray(step) >= 2))
  with pytest.raises(ValueError, match="key"):
    rl.partition_tokens(step, ent, **kw)
  with pytest.raises(ValueError, match="mode"):
    rl.partition_tokens(step, ent, num_steps=4, sketch_fraction=0.5, structure_ratio=0.2, mode="bogus")


@given(shape, st.floats(0.0, 5.0), st.floats(0.01, 5.0), st.booleans(), st.integers(0, 2**31 - 1))
def test_credit_matches_numpy_and_normalizes(bn, sw, rw, normalize, seed):
  is_s = np.random.default_rng(seed).random(bn) < 0.3
  got = np.asarray(rl.credit_weights(jnp.asarray(is_s), structure_weight=sw, refine_weight=rw, normalize=normalize))
  np.testing.assert_allclose(got, np_credit(is_s, sw, rw, normalize), rtol=1e-5, atol=1e-6)
  if normalize:
    np.testing.assert_allclose(got.mean(axis=1), 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------- schedule & update sets
def test_stage_schedule_and_ramp():
  assert rl.stage_schedule(2, 1, 3) == (0, 0, 1, 2, 2, 2)
  assert [rl.stage_of_iteration(k, 2, 1, 3) for k in range(6)] == [0, 0, 1, 2, 2, 2]
  with pytest.raises(ValueError, match="iteration"):
    rl.stage_of_iteration(6, 2, 1, 3)
  ramp = rl.update_fractions(rl.preset("maskgrpo"))  # MaskGRPO's r_k, K=6, m=0.6
  np.testing.assert_allclose(ramp, [0.6 + 0.4 * (k + 1) / 6 for k in range(5)] + [0.999])


@given(shape, st.sampled_from([0.1, 0.3, 0.5, 0.7, 1.0]), st.integers(0, 2**31 - 1))
def test_update_set_is_subset_of_given_size(bn, frac, seed):
  cand = np.random.default_rng(seed).random(bn) < 0.6
  key = jax.random.key(seed)
  got = np.asarray(_update_set(key, jnp.asarray(cand), frac))
  assert not np.any(got & ~cand)
  want = [math.ceil(frac * c - 1e-3) for c in cand.sum(1)]
  np.testing.assert_array_equal(got.sum(1), want)
  np.testing.assert_array_equal(got, np.asarray(_update_set(key, jnp.asarray(cand), frac)))


# ----------------------------------------------------------------------------- loss
@functools.partial(jax.jit, static_argnums=(5, 6))
def _loss_and_grad(logp, old, ref, adv, mask, eps, beta):
  f = lambda lp: rl.ht_grpo_loss(lp, old, ref, adv, mask, clip_eps=eps, beta=beta)
  return f(logp), jax.grad(lambda lp: f(lp)[0])(logp)


@given(shape, st.sampled_from([0.1, 0.2]), st.sampled_from([0.0, 0.04]), st.integers(0, 2**31 - 1))
def test_loss_matches_numpy(bn, eps, beta, seed):
  rng = np.random.default_rng(seed)
  logp, old, ref = (-rng.uniform(0.1, 3, bn).astype(np.float32) for _ in range(3))
  old = (logp + rng.normal(0, 0.3, bn)).astype(np.float32)
  adv = rng.normal(size=bn).astype(np.float32)
  mask = rng.random(bn) < 0.7
  (s, c, met), grad = _loss_and_grad(
      jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask), eps, beta
  )
  s_ref, c_ref, g_ref, extra = np_loss(logp, old, ref, adv, mask, eps, beta)
  np.testing.assert_allclose(float(s), s_ref, rtol=1e-4, atol=1e-4)
  assert float(c) == c_ref
  np.testing.assert_allclose(np.asarray(grad), g_ref, rtol=1e-4, atol=1e-5)
  for name, want in extra.items():
    if name != "kl" or beta:
      np.testing.assert_allclose(float(met[name]), want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_loss_ratio_one_and_zero_advantage():
  lp = jnp.asarray([[-1.0, -2.0, -0.5]])
  s, c, met = rl.ht_grpo_loss(lp, lp, lp, jnp.zeros((1, 3)), jnp.ones((1, 3), bool), clip_eps=0.2, beta=0.0)
  assert float(s) == 0.0 and float(c) == 3.0
  assert float(met["ratio_min"]) == float(met["ratio_max"]) == 1.0 and float(met["approx_kl"]) == 0.0
  g = jax.grad(
      lambda x: rl.ht_grpo_loss(x, lp, None, jnp.zeros((1, 3)), jnp.ones((1, 3), bool), clip_eps=0.2, beta=0.0)[0]
  )(lp)
  assert np.all(np.asarray(g) == 0)


def test_logp_adv_cov_is_the_masked_token_covariance():
  rng = np.random.default_rng(0)
  logp = -rng.uniform(0.1, 3, (3, 7)).astype(np.float32)
  adv = rng.normal(size=(3, 7)).astype(np.float32)
  mask = rng.random((3, 7)) < 0.6
  _, c, met = rl.ht_grpo_loss(
      jnp.asarray(logp), jnp.asarray(logp), None, jnp.asarray(adv), jnp.asarray(mask), clip_eps=0.2, beta=0.0
  )
  got = rl.finalize_metrics(met, c)
  lp, a = logp[mask].astype(np.float64), adv[mask].astype(np.float64)
  np.testing.assert_allclose(float(got["logp_adv_cov"]), np.mean(lp * a) - lp.mean() * a.mean(), atol=1e-5)


@pytest.mark.parametrize("reward_the_rare_token", [True, False])
def test_logp_adv_cov_sign_says_which_way_a_step_moves_the_entropy(reward_the_rare_token):
  """One softmax position, samples of a common and a rare token with zero-mean advantages: rewarding the
  rare one (covariance < 0) flattens the distribution, rewarding the common one (> 0) sharpens it."""
  logits = jnp.asarray([2.0, 0.0, 0.0])
  tokens = jnp.asarray([[0, 0, 0, 1]])
  adv = jnp.asarray([[-1.0, -1.0, -1.0, 3.0]]) if reward_the_rare_token else jnp.asarray([[1.0, 1.0, 1.0, -3.0]])
  mask = jnp.ones((1, 4), bool)

  def loss(z):
    logp, _ = rl.token_logp_entropy(jnp.broadcast_to(z, (1, 4, 3)), tokens)
    return rl.ht_grpo_loss(logp, jax.lax.stop_gradient(logp), None, adv, mask, clip_eps=0.2, beta=0.0)

  g = jax.grad(lambda z: loss(z)[0] / 4)(logits)
  entropy = lambda z: float(-(jax.nn.softmax(z) * jax.nn.log_softmax(z)).sum())
  _, count, met = loss(logits)
  cov = float(rl.finalize_metrics(met, count)["logp_adv_cov"])
  change = entropy(logits - 0.1 * g) - entropy(logits)
  assert (cov < 0) == reward_the_rare_token and (change > 0) == reward_the_rare_token
  assert abs(cov) > 0.1 and abs(change) > 1e-3


def test_entropy_bonus_adds_minus_coef_times_entropy_and_its_gradient():
  """entropy_coef > 0: the loss sum is the plain loss minus coef x the masked entropy sum, and the
  gradient through the logits is the plain one minus coef x the entropy's gradient (the bonus is
  not a stop-gradient metric); a step along it raises the entropy at fixed zero advantage."""
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(2, 5, 6)).astype(np.float32) * 2.0)
  tokens = jnp.asarray(rng.integers(0, 6, (2, 5)), jnp.int32)
  mask = jnp.asarray(rng.random((2, 5)) < 0.7)
  adv = jnp.asarray(rng.normal(size=(2, 5)).astype(np.float32))
  coef = 0.3

  def loss(z, c):
    logp, ent = rl.token_logp_entropy(z, tokens)
    return rl.ht_grpo_loss(
        logp, jax.lax.stop_gradient(logp), None, adv, mask, clip_eps=0.2, beta=0.0, entropy=ent, entropy_coef=c
    )[0]

  ent_sum = lambda z: (rl.token_logp_entropy(z, tokens)[1] * mask).sum()
  np.testing.assert_allclose(float(loss(logits, coef)), float(loss(logits, 0.0) - coef * ent_sum(logits)), rtol=1e-5)
  g_bonus, g_plain, g_ent = jax.grad(loss)(logits, coef), jax.grad(loss)(logits, 0.0), jax.grad(ent_sum)(logits)
  np.testing.assert_allclose(np.asarray(g_bonus), np.asarray(g_plain - coef * g_ent), rtol=1e-4, atol=1e-6)

  def flat(z):  # zero advantage everywhere: only the bonus moves the logits
    logp, ent = rl.token_logp_entropy(z, tokens)
    zero = jnp.zeros_like(adv)
    return rl.ht_grpo_loss(logp, logp, None, zero, mask, clip_eps=0.2, beta=0.0, entropy=ent, entropy_coef=coef)[0]

  assert float(ent_sum(logits - 0.1 * jax.grad(flat)(logits))) > float(ent_sum(logits)) + 1e-3
  with pytest.raises(ValueError, match="entropy_coef"):
    rl.ht_grpo_loss(logits[..., 0], logits[..., 0], None, adv, mask, clip_eps=0.2, beta=0.0, entropy_coef=coef)


# ----------------------------------------------------------------------------- estimators
@given(
    st.sampled_from(rl.ESTIMATORS),
    st.sampled_from(["structure", "none"]),
    st.sampled_from(["constant", "ramp"]),
    st.integers(1, 2),
    st.integers(0, 2**31 - 1),
)
def test_estimator_invariants(estimator, ctx, sched, tg, seed):
  cfg = rl.HTGRPOConfig(
      group_size=2,
      num_sampler_steps=6,
      n_global=1,
      n_struct=2,
      n_refine=2,
      estimator=estimator,
      refine_context=ctx,
      update_schedule=sched,
      update_fraction=0.5,
      trajectory_group=tg,
  )
  tokens, step, ent = rollout_record(seed)
  is_s = rl.partition_tokens(
      step, ent, num_steps=6, sketch_fraction=cfg.sketch_fraction, structure_ratio=cfg.structure_ratio
  )
  key = jax.random.key(seed)
  canv, loss = rl.all_canvases(cfg, key, tokens, step, is_s)
  canv2, loss2 = rl.all_canvases(cfg, key, tokens, step, is_s)  # same key -> same canvases (old/ref/new)
  np.testing.assert_array_equal(canv, canv2)
  np.testing.assert_array_equal(loss, loss2)
  canv, loss, tokens, step, is_s = map(np.asarray, (canv, loss, tokens, step, is_s))
  revealed = canv != MASK
  sched_ = rl.stage_schedule(1, 2, 2)
  for k, stage in enumerate(sched_):
    # Revealed slots hold the rollout's codes; loss tokens are masked and inside the stage's candidates.
    np.testing.assert_array_equal(canv[k][revealed[k]], tokens[revealed[k]])
    assert not np.any(loss[k] & revealed[k])
    if stage == rl.STAGE_STRUCT:
      assert not np.any(loss[k] & ~is_s)
    if stage == rl.STAGE_REFINE:
      assert not np.any(loss[k] & is_s)
    if estimator == "htgrpo":
      want = is_s if (stage == rl.STAGE_REFINE and ctx == "structure") else np.zeros_like(is_s)
      np.testing.assert_array_equal(revealed[k], want)
    elif estimator in ("random_remask", "uni"):
      np.testing.assert_array_equal(~revealed[k], loss[k])
    else:  # trajectory: loss tokens share one step group; revealed = committed in earlier groups
      grp = step // tg
      for i in range(tokens.shape[0]):
        if loss[k, i].any():
          s = np.unique(grp[i][loss[k, i]])
          assert len(s) == 1
          np.testing.assert_array_equal(revealed[k, i], grp[i] < s[0])
  if estimator == "uni":  # the ratio reaches 1 at the last iteration: every candidate is masked
    np.testing.assert_array_equal(loss[-1], ~is_s)
  if estimator == "htgrpo":
    groups = rl.canvas_groups(cfg)
    for k in range(len(groups)):
      for j in range(len(groups)):
        if groups[k] == groups[j]:
          np.testing.assert_array_equal(canv[k], canv[j])


def test_canvas_groups_dedup():
  assert rl.canvas_groups(rl.preset("htgrpo")) == (0, 0, 0, 0, 1, 1)
  assert rl.canvas_groups(rl.preset("htgrpo", refine_context="none")) == (0,) * 6
  assert rl.canvas_groups(rl.preset("maskgrpo")) == tuple(range(6))


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(num_iterations=5), "num_iterations"),
        (dict(group_size=1), "group_size"),
        (dict(sketch_fraction=0.0), "sketch_fraction"),
        (dict(structure_ratio=1.5), "structure_ratio"),
        (dict(update_fraction=-0.1), "update_fraction"),
        (dict(estimator="ppo"), "estimator"),
        (dict(partition_mode="bogus"), "partition_mode"),
        (dict(refine_context="all"), "refine_context"),
        (dict(sketch_context="prefix"), "sketch_context"),
        (dict(estimator="trajectory", sketch_context="trajectory"), "sketch_context"),
        (dict(estimator="random_remask", refine_context="trajectory"), "refine_context"),
        (dict(min_mask_rate=1.0), "min_mask_rate"),
        (dict(clip_eps=0.0), "clip_eps"),
        (dict(beta=-1.0), "beta"),
        (dict(entropy_coef=-0.01), "entropy_coef"),
        (dict(entropy_coef=float("nan")), "entropy_coef"),
        (dict(structure_weight=0.0, refine_weight=0.0), "structure_weight"),
        (dict(micro_batch_size=-2), "micro_batch_size"),
    ],
)
def test_bad_config_raises_naming_field(kw, field):
  with pytest.raises(ValueError, match=f"HTGRPOConfig.{field}"):
    rl.HTGRPOConfig(**kw)


def test_config_messages_and_batch_checks():
  with pytest.raises(ValueError, match=r"num_iterations=5 must equal n_global\+n_struct\+n_refine=6"):
    rl.HTGRPOConfig(num_iterations=5)
  cfg = rl.HTGRPOConfig(group_size=4, micro_batch_size=6)
  with pytest.raises(ValueError, match="group_size=4 must divide the batch size 18"):
    cfg.validate_batch(18)
  with pytest.raises(ValueError, match="micro_batch_size=6 must divide"):
    cfg.validate_batch(16)
  cfg.validate_batch(24)
  assert rl.HTGRPOConfig().num_iterations == 6
  with pytest.raises(ValueError, match="preset"):
    rl.preset("grpo")
  for name in rl.PRESETS:
    c = rl.preset(name)
    if name != "htgrpo":
      assert (c.n_struct, c.n_refine, c.structure_weight, c.refine_weight) == (0, 0, 1.0, 1.0)
