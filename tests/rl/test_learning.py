"""A tiny policy learns a structure-dependent reward through make_train_step, and HT-GRPO's hierarchical
credit gets there in fewer steps than uniform credit from the same seed.

The toy world: 16 slots, 8 codes, a 4-step sampler that commits the 4 "layout" slots first (step 0) and
the 12 "detail" slots over steps 1-3. The reward is the fraction of layout slots that drew code 0, so only
the sketch matters. The partition is not told which slots those are: it finds them from the recorded
commit steps (sketch phase = step 0, structure_ratio = 4/16). Both runs use the same estimator, stages,
optimizer and seed; only (structure_weight, refine_weight) differ: (4, 1) vs (1, 1), both normalised to
mean 1 per image. Under uniform credit the 12 detail tokens feed the shared layers an advantage that is
pure noise with respect to their own values; hierarchical credit moves that weight onto the layout tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htgrpo_jax import rl
from tests.helpers.rl_toy import ToyPolicy, linen_logits_fn, sample

N, C, T, NS = 16, 8, 4, 4
PROMPTS, G = 4, 8
B = PROMPTS * G
THRESHOLD = 0.8  # mean reward over the last 3 rollout batches
MODEL = ToyPolicy(C, N, dim=16)
FN = linen_logits_fn(MODEL)  # one function object: the jitted test sampler compiles once for both runs


def steps_to_threshold(structure_weight, refine_weight, seed=0, max_steps=40):
  model, fn = MODEL, FN
  cfg = rl.HTGRPOConfig(
      group_size=G,
      num_sampler_steps=T,
      n_global=1,
      n_struct=1,
      n_refine=1,
      sketch_fraction=0.25,
      structure_ratio=NS / N,
      structure_weight=structure_weight,
      refine_weight=refine_weight,
      beta=0.0,
      clip_eps=0.2,
  )
  opt = rl.make_optimizer(2e-3)
  key = jax.random.key(seed)
  prompts = jnp.asarray(np.repeat(np.arange(PROMPTS), G)[:, None] * np.ones((1, 2), int), jnp.int32)
  params = model.init(jax.random.fold_in(key, 0), prompts, jnp.zeros((B, N), jnp.int32))["params"]
  state = rl.TrainState.create(params, opt, with_reference=False)
  step = rl.make_train_step(fn, opt, cfg)
  priority = jnp.asarray(np.r_[np.ones(NS), np.zeros(N - NS)] + np.linspace(0, 0.5, N), jnp.float32)
  priority = jnp.broadcast_to(priority, (B, N))
  history = []
  for i in range(max_steps):
    img, cstep, cent, clogp = sample(
        fn, state.params, prompts, priority, jax.random.fold_in(key, 1000 + i), num_steps=T
    )
    reward = (img[:, :NS] == 0).mean(-1).astype(jnp.float32)
    history.append(float(reward.mean()))
    if len(history) >= 3 and np.mean(history[-3:]) >= THRESHOLD:
      return i, history
    state, metrics = step(state, rl.Rollout(prompts, img, cstep, cent, clogp, reward), jax.random.fold_in(key, 2))
    if i == 0:  # the partition recovered exactly the layout slots
      assert float(metrics["structure_frac"]) == NS / N
  return max_steps, history


def test_hierarchical_credit_learns_structure_faster():
  ht_steps, ht_hist = steps_to_threshold(4.0, 1.0)
  uni_steps, uni_hist = steps_to_threshold(1.0, 1.0)
  print(f"steps to mean reward >= {THRESHOLD}: HT-GRPO credit {ht_steps}, uniform credit {uni_steps}")
  print("HT  rewards", np.round(ht_hist, 2).tolist())
  print("uni rewards", np.round(uni_hist, 2).tolist())
  assert ht_hist[0] < 0.3 and uni_hist[0] < 0.3  # it starts far from the threshold
  assert ht_steps < 40 and uni_steps < 40, (ht_steps, uni_steps)  # both learn it
  assert ht_steps < uni_steps, (ht_steps, uni_steps)


@pytest.mark.slow  # ~2-3 min: 10 runs
def test_hierarchical_credit_is_faster_across_seeds():
  """The comparison above is one seed; over five more (new inits and sampling noise) hierarchical
  credit reaches the threshold in fewer steps on at least four and on average (measured on this
  CPU: HT 8/6/7/9/6 vs uniform 9/8/8/12/7 steps for seeds 1-5)."""
  pairs = [(steps_to_threshold(4.0, 1.0, seed=s)[0], steps_to_threshold(1.0, 1.0, seed=s)[0]) for s in range(1, 6)]
  print("(HT, uniform) steps per seed:", pairs)
  assert all(ht < 40 and uni < 40 for ht, uni in pairs), pairs  # every run learns it
  assert sum(ht < uni for ht, uni in pairs) >= 4, pairs
  assert np.mean([ht for ht, _ in pairs]) < np.mean([uni for _, uni in pairs]), pairs
