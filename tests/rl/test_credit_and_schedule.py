"""Credit normalisation per image vs per stage, and the htgrpo update schedule (ramp vs constant): the
ramp only adds sampling noise when the scored canvas does not change (measured here; run with -s)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from htgrpo_jax import rl
from tests.helpers.rl_toy import ToyPolicy, linen_logits_fn, random_rollout, sample
from tests.helpers.rl_reference import np_credit, np_partition

B, N, C, T, G = 8, 16, 4, 4, 4


@pytest.fixture(scope="module")
def toy():
  model = ToyPolicy(C, N, dim=8)
  ro = random_rollout(np.random.default_rng(3), B, N, C, T, lp=2)
  params = model.init(jax.random.key(0), ro.prompt_tokens, ro.image_tokens)["params"]
  return model, params, ro


def np_loss_set_credit(w, mask):
  m = (w * mask).sum(1, keepdims=True) / np.maximum(mask.sum(1, keepdims=True), 1)
  return w / np.where(m > 0, m, 1.0)


def test_loss_set_credit_matches_numpy():
  rng = np.random.default_rng(0)
  w = np.where(rng.random((5, 9)) < 0.3, 2.0, 1.0).astype(np.float32)
  mask = rng.random((5, 9)) < 0.5
  mask[0] = False  # an empty loss set stays as it is
  got = np.asarray(rl.loss_set_credit(jnp.asarray(w), jnp.asarray(mask)))
  np.testing.assert_allclose(got, np_loss_set_credit(w, mask), rtol=1e-6)
  for i in range(1, 5):
    if mask[i].any():
      np.testing.assert_allclose(got[i][mask[i]].mean(), 1.0, rtol=1e-6)


def _run(model, params, ro, **kw):
  base = dict(
      group_size=G,
      num_sampler_steps=T,
      n_global=0,
      n_struct=1,
      n_refine=1,
      sketch_fraction=0.5,
      structure_ratio=0.25,
      update_schedule="constant",
      update_fraction=1.0,
      beta=0.0,
  )
  cfg = rl.HTGRPOConfig(**{**base, **kw})
  opt = optax.sgd(1.0)
  step = rl.make_train_step(linen_logits_fn(model), opt, cfg, donate=False)
  return step(rl.TrainState.create(params, opt, with_reference=False), ro, jax.random.key(0))


@pytest.mark.slow  # the option's numbers; image normalisation (the default) is checked in the default run
def test_stage_normalisation_gives_each_stage_mean_credit_one(toy):
  model, params, ro = toy
  is_s = np_partition(np.asarray(ro.commit_step), np.asarray(ro.commit_entropy), T, 0.5, 0.25, "entropy")
  w_img = np_credit(is_s, 2.0, 1.0, True)
  _, m_img = _run(model, params, ro, credit_normalization="image")
  _, m_stage = _run(model, params, ro, credit_normalization="stage")
  print(
      f"mean credit on the loss tokens, image-normalised: struct {float(m_img['struct']['credit']):.3f}, "
      f"refine {float(m_img['refine']['credit']):.3f}; stage-normalised: struct "
      f"{float(m_stage['struct']['credit']):.3f}, refine {float(m_stage['refine']['credit']):.3f}"
  )
  np.testing.assert_allclose(float(m_img["struct"]["credit"]), w_img[is_s].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m_img["refine"]["credit"]), w_img[~is_s].mean(), rtol=1e-5)
  assert float(m_img["struct"]["credit"]) > 1.3 and float(m_img["refine"]["credit"]) < 0.9
  for stage in ("struct", "refine", "total"):
    np.testing.assert_allclose(float(m_stage[stage]["credit"]), 1.0, rtol=1e-5)
  # Struct and refine loss sets hold one weight each: 'stage' credit there equals uniform credit exactly.
  s_stage, _ = _run(model, params, ro, credit_normalization="stage")
  s_uni, _ = _run(model, params, ro, structure_weight=1.0, refine_weight=1.0)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
      s_stage.params,
      s_uni.params,
  )
  # ... and the global stage (all tokens in the loss) is the same under both normalisations.
  g_img, _ = _run(model, params, ro, n_global=1, n_struct=0, n_refine=0, credit_normalization="image")
  g_stage, _ = _run(model, params, ro, n_global=1, n_struct=0, n_refine=0, credit_normalization="stage")
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
      g_img.params,
      g_stage.params,
  )
  with pytest.raises(ValueError, match="HTGRPOConfig.credit_normalization"):
    rl.HTGRPOConfig(credit_normalization="batch")


# ----------------------------------------------------------------------------- update schedule (F5)
def _recorder() -> optax.GradientTransformation:
  """Applies no update and accumulates the gradients in its state (so all K see the same params)."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda grads, st, params=None: (jax.tree.map(jnp.zeros_like, grads), jax.tree.map(jnp.add, st, grads)),
  )


@pytest.mark.slow
def test_htgrpo_preset_uses_the_full_update_set_and_ramp_only_adds_noise():
  """htgrpo scores every global/struct iteration on one all-mask canvas: the ramp's random update subsets
  leave the expected gradient unchanged and add variance. Measured over step keys on the toy policy."""
  assert rl.preset("htgrpo").update_schedule == "constant"
  assert rl.preset("htgrpo").update_fraction == 1.0
  assert rl.preset("maskgrpo").update_schedule == "ramp"  # the baseline keeps MaskGRPO's ramp
  n, c, t, g, p = 16, 8, 4, 8, 4
  model = ToyPolicy(c, n, dim=16)
  fn = linen_logits_fn(model)
  prompts = jnp.asarray(np.repeat(np.arange(p), g)[:, None] * np.ones((1, 2), int), jnp.int32)
  params = model.init(jax.random.key(0), prompts, jnp.zeros((p * g, n), jnp.int32))["params"]
  img, cs, ent, lp = sample(
      fn, params, prompts, jnp.broadcast_to(jnp.linspace(1, 0, n), (p * g, n)), jax.random.key(1), num_steps=t
  )
  rewards = ((img[:, :4] == 0).mean(-1) + (img[:, 4:] == 1).mean(-1)).astype(jnp.float32)
  ro = rl.Rollout(prompts, img, cs, ent, lp, rewards)
  opt = _recorder()
  out = {}
  for sched in ("ramp", "constant"):
    cfg = rl.preset("htgrpo", group_size=g, num_sampler_steps=t, update_schedule=sched, update_fraction=1.0, beta=0.0)
    step = rl.make_train_step(fn, opt, cfg, donate=False)
    grads = []
    for k in range(8):
      st, _ = step(rl.TrainState.create(params, opt, with_reference=False), ro, jax.random.key(100 + k))
      grads.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(st.opt_state)]))
    grads = np.stack(grads)
    mean = grads.mean(0)
    out[sched] = (float(((grads - mean) ** 2).sum(1).mean() / (mean**2).sum()), mean)
  cos = float(out["ramp"][1] @ out["constant"][1] / np.linalg.norm(out["ramp"][1]) / np.linalg.norm(out["constant"][1]))
  print(
      f"relative gradient variance over 8 step keys (sum of the K=6 gradients at fixed params): "
      f"ramp {out['ramp'][0]:.4f}, constant {out['constant'][0]:.2e}; cosine(mean ramp, constant) {cos:.4f}"
  )
  assert out["constant"][0] < 1e-10 < 1e-3 < out["ramp"][0]
  assert cos > 0.95  # the ramp estimates the same direction, only noisier
