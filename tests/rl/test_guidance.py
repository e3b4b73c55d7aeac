"""Estimator guidance: with 'guided' the step scores tokens under the same CFG'd, tempered distribution the
sampler drew them from (ratio 1 at k=0, zero behaviour gap on comparable tokens); with the plain
conditional policy ('none') the logged behaviour gap shows the mismatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from htgrpo_jax import rl
from htgrpo_jax.sampling import SamplerConfig, guided_canvas_logits_fn, make_sampler

C, NP, N, LP = 6, 4, 16, 3  # codebook, prompt ids (0 = unconditional), slots, prompt length


def _params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {
      "tab": 1.5 * jax.random.normal(k1, (NP, N, C)),
      "emb": jax.random.normal(k2, (C + 1, 5)),
      "w": 0.7 * jax.random.normal(k3, (5, C)),
  }


def canvas_fn(params, prompt_tokens, canvas):
  """Prompt table plus a term that depends on the committed tokens (so canvases matter)."""
  e = params["emb"][canvas + 1]
  left = jnp.pad(e, ((0, 0), (1, 0), (0, 0)))[:, :-1]
  return params["tab"][prompt_tokens[:, 0]] + (left + e.mean(axis=1, keepdims=True)) @ params["w"]


def _prompts(b):
  ids = 1 + np.arange(b) % (NP - 1)
  return jnp.asarray(np.repeat(ids[:, None], LP, 1), jnp.int32)


UNCOND = np.zeros((LP,), np.int32)
SCFG = SamplerConfig(
    num_steps=4, sketch_steps=2, rule="maskgit", cfg_scale=1.5, temperature=0.8, temperature_mode="constant"
)


def test_guided_logits_fn_is_the_sampling_distribution():
  params, p = _params(), _prompts(8)
  canvas = jnp.full((8, N), rl.MASK, jnp.int32).at[:, 3].set(2)
  fn = guided_canvas_logits_fn(canvas_fn, SCFG, UNCOND)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, C, (8, N)), jnp.int32)
  logp, _ = rl.token_logp_entropy(fn(params, p, canvas), tokens)
  zc = np.asarray(canvas_fn(params, p, canvas), np.float64)
  zu = np.asarray(canvas_fn(params, jnp.zeros_like(p), canvas), np.float64)
  want = special.log_softmax(((1 + 1.5) * zc - 1.5 * zu) / 0.8, axis=-1)
  np.testing.assert_allclose(
      np.asarray(logp), np.take_along_axis(want, np.asarray(tokens)[..., None], -1)[..., 0], atol=1e-5
  )
  with pytest.raises(ValueError, match="uncond_prompt"):
    guided_canvas_logits_fn(canvas_fn, SCFG, np.zeros((2, LP), np.int32))


@pytest.mark.parametrize("guidance", ["guided", "none"])
def test_guided_estimator_scores_the_behaviour_policy(guidance):
  """A CFG 1.5 / temperature 0.8 rollout. 'guided': k=0 ratio is 1 and the step's old log-prob of the
  tokens drawn on the all-mask canvas (step 0) equals the recorded commit_logp; 'none' scores the bare
  conditional policy, whose gap the metric reports."""
  b, g = 8, 4
  params, p = _params(), _prompts(b)
  sampler = make_sampler(canvas_fn, SCFG, num_tokens=N)
  rec = sampler.sample(params, p, jnp.broadcast_to(jnp.asarray(UNCOND), p.shape), jax.random.key(1))
  rewards = jnp.asarray(np.random.default_rng(0).normal(size=b), jnp.float32)
  ro = rec.to_rollout(p, rewards)
  cfg = rl.HTGRPOConfig(
      group_size=g,
      num_sampler_steps=4,
      n_global=1,
      n_struct=1,
      n_refine=1,
      update_schedule="constant",
      update_fraction=1.0,
      refine_context="none",
      estimator_guidance=guidance,
  )
  fn = guided_canvas_logits_fn(canvas_fn, SCFG, UNCOND) if guidance == "guided" else canvas_fn
  opt = rl.make_optimizer(1e-2)
  _, met = rl.make_train_step(fn, opt, cfg, donate=False)(rl.TrainState.create(params, opt), ro, jax.random.key(2))
  it = met["iter"]
  np.testing.assert_allclose([float(it["ratio_min"][0]), float(it["ratio_max"][0])], 1.0, rtol=2e-7)
  gap, count = float(met["behaviour_gap"]), float(met["behaviour_gap_tokens"])
  assert count == float((np.asarray(rec.commit_step) == 0).sum()) > 0  # step-0 tokens on the all-mask canvas
  print(f"{guidance}: mean |commit_logp - logp_old| = {gap:.3g} over {count:.0f} tokens")
  if guidance == "guided":
    assert gap < 1e-5
  else:
    assert gap > 0.05


def test_estimator_guidance_is_validated():
  with pytest.raises(ValueError, match="HTGRPOConfig.estimator_guidance"):
    rl.HTGRPOConfig(estimator_guidance="cfg")
  assert rl.HTGRPOConfig().estimator_guidance == "none"
  for name in rl.PRESETS:
    assert rl.preset(name).estimator_guidance == "none"
