"""Is the structure set S a real selection among the sketch-phase candidates?

Measured on the real sampler with configs/geneval.py's settings (cosine, T = 12, N = 8 x 8), under the
earlier default's emerge rule (where the defect was found: which slots commit in the sketch phase does
not depend on the logits, so a constant policy gives the exact candidate counts) and the shipped maskgit
rule (a fixed number of commits per step). The step's selectivity metrics are checked against NumPy."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htgrpo_jax import rl, tasks, trainer
from htgrpo_jax.sampling import make_sampler
from tests.helpers.rl_toy import ToyPolicy, linen_logits_fn, random_rollout

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _selectivity(commit_step, entropy, t, sketch_fraction, structure_ratio):
  """(mean |S| / |candidates|, fraction of images with S == candidates) of a partition."""
  s = np.asarray(
      rl.partition_tokens(
          commit_step, entropy, num_steps=t, sketch_fraction=sketch_fraction, structure_ratio=structure_ratio
      )
  )
  cand = (np.asarray(commit_step) >= 0) & (
      np.asarray(commit_step) < rl.HTGRPOConfig(num_sampler_steps=t, sketch_fraction=sketch_fraction).sketch_steps
  )
  n_s, n_c = s.sum(1), cand.sum(1)
  return float(np.mean(n_s / np.maximum(n_c, 1))), float(np.mean(n_s == n_c))


@pytest.mark.parametrize("variant", ["htgrpo,emerge", "htgrpo"])
def test_default_partition_selects_within_the_sketch_candidates(variant):
  cfg = tasks.load_config_file(os.path.join(REPO, "configs", "geneval.py"), variant)
  p = trainer.plan(cfg)
  n = (cfg.world.canvas // cfg.world.patch) ** 2
  b = 1024
  # A constant policy (passed as params so XLA does not constant-fold the whole sampler).
  const = lambda params, prompt, canvas: jnp.broadcast_to(params, canvas.shape + (4,))
  sampler = make_sampler(const, p.rollout_sampler, num_tokens=n)
  prompts = jnp.zeros((b, 2), jnp.int32)
  rec = sampler.sample(jnp.zeros((4,), jnp.float32), prompts, prompts, jax.random.key(0))
  # Entropies from a random draw: which candidates enter S does not change |S|.
  ent = jax.random.uniform(jax.random.key(1), (b, n))
  t = p.rl.num_sampler_steps
  assert p.rl.sketch_steps == p.sampler.sketch_steps
  old = _selectivity(rec.commit_step, ent, t, 0.5, 0.25)  # the earlier defaults
  new = _selectivity(rec.commit_step, ent, t, p.rl.sketch_fraction, p.rl.structure_ratio)
  cand = float(np.mean((np.asarray(rec.commit_step) < p.rl.sketch_steps).sum(1)))
  print(
      f"configs/geneval.py sampler ({p.sampler.rule}, {p.sampler.schedule}, T={t}, N={n}): "
      f"{cand:.1f} sketch-phase candidates per image"
  )
  print(f"  sketch_fraction 0.5, structure_ratio 0.25: |S|/|cand| {old[0]:.3f}, S == cand in {old[1]:.1%}")
  print(
      f"  sketch_fraction {p.rl.sketch_fraction}, structure_ratio {p.rl.structure_ratio}: "
      f"|S|/|cand| {new[0]:.3f}, S == cand in {new[1]:.1%}"
  )
  assert old[0] > 0.75  # the defect as measured: S takes nearly every candidate ...
  if p.sampler.rule == "emerge":
    assert old[1] > 0.15  # ... and all of them in many images (maskgit commits a fixed count per step)
  assert new[0] < 0.6 and new[1] < 0.02


def test_step_logs_structure_selectivity():
  b, n, c, t, g = 8, 16, 4, 4, 4
  ro = random_rollout(np.random.default_rng(2), b, n, c, t, lp=2)
  # Image 0 commits only two tokens in the sketch phase: S == candidates there.
  ro = ro.replace(commit_step=ro.commit_step.at[0].set(jnp.asarray([0, 1] + [3] * (n - 2), jnp.int32)))
  model = ToyPolicy(c, n, dim=8)
  params = model.init(jax.random.key(0), ro.prompt_tokens, ro.image_tokens)["params"]
  cfg = rl.HTGRPOConfig(
      group_size=g,
      num_sampler_steps=t,
      n_global=1,
      n_struct=1,
      n_refine=1,
      sketch_fraction=0.5,
      structure_ratio=0.25,
      beta=0.0,
  )
  opt = rl.make_optimizer(1e-3)
  _, met = rl.make_train_step(linen_logits_fn(model), opt, cfg, donate=False)(
      rl.TrainState.create(params, opt, with_reference=False), ro, jax.random.key(0)
  )
  sel, frac = _selectivity(ro.commit_step, ro.commit_entropy, t, 0.5, 0.25)
  np.testing.assert_allclose(float(met["structure_selectivity"]), sel, rtol=1e-6)
  np.testing.assert_allclose(float(met["structure_all_candidates_frac"]), frac, rtol=1e-6)
  assert 0 < frac < 1
