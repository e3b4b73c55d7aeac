"""HT-GRPO's stages on trajectory-faithful canvases: ``sketch_context`` / ``refine_context='trajectory'``.

The global/struct (and refine) iterations replay one recorded sampler step group per image, as TraceGRPO
does, inside HT-GRPO's stage schedule, partition and credit. Checked: what a canvas may reveal, where the
loss set lies, that the group is drawn uniformly among the groups holding a candidate, that the defaults
do not move, that the step scores each replayed canvas with its own old/reference pass, and that the
struct stage's gradient is alive.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from htgrpo_jax import rl
from htgrpo_jax.rl import MASK
from htgrpo_jax.rl.train_step import update_sets
from tests.helpers.rl_reference import rollout_record
from tests.helpers.rl_toy import ToyPolicy, linen_logits_fn, random_rollout, struct_grad_norm

T = 6


def _cfg(**kw):
  base = dict(group_size=2, num_sampler_steps=T, n_global=1, n_struct=2, n_refine=2)
  return rl.HTGRPOConfig(**{**base, **kw})


def _partition(step, ent, cfg):
  return rl.partition_tokens(
      step, ent, num_steps=T, sketch_fraction=cfg.sketch_fraction, structure_ratio=cfg.structure_ratio
  )


@pytest.mark.parametrize(
    "sketch_ctx,refine_ctx", [("trajectory", "structure"), ("all_mask", "trajectory"), ("trajectory", "trajectory")]
)
@pytest.mark.parametrize("tg,fraction", [(1, 1.0), (2, 0.5)])
def test_replayed_canvases_reveal_only_earlier_groups(sketch_ctx, refine_ctx, tg, fraction):
  """A replayed canvas reveals exactly the tokens committed before the drawn group (plus S in refine);
  the loss set lies inside the stage's candidates and inside that one group, and with fraction 1 it is
  every candidate committed there."""
  cfg = _cfg(sketch_context=sketch_ctx, refine_context=refine_ctx, trajectory_group=tg, update_fraction=fraction)
  sched = rl.stage_schedule(1, 2, 2)
  for seed in range(4):
    tokens, step, ent = rollout_record(seed, b=6, t=T)
    is_s = _partition(step, ent, cfg)
    canv, loss = map(np.asarray, rl.all_canvases(cfg, jax.random.key(seed), tokens, step, is_s))
    tokens, step, is_s = map(np.asarray, (tokens, step, is_s))
    grp = step // tg
    for k, stage in enumerate(sched):
      replayed = (refine_ctx if stage == rl.STAGE_REFINE else sketch_ctx) == "trajectory"
      revealed = canv[k] != MASK
      np.testing.assert_array_equal(canv[k][revealed], tokens[revealed])
      cand = np.asarray(rl.stage_candidates(stage, jnp.asarray(is_s)))
      assert not np.any(loss[k] & ~cand) and not np.any(loss[k] & revealed)
      if not replayed:  # the default canvases: all-mask, or S revealed in refine
        want = is_s if stage == rl.STAGE_REFINE and refine_ctx == "structure" else np.zeros_like(is_s)
        np.testing.assert_array_equal(revealed, want)
        continue
      always = is_s if stage == rl.STAGE_REFINE else np.zeros_like(is_s)
      for i in range(tokens.shape[0]):
        assert loss[k, i].any() == cand[i].any()  # every image with a candidate gets a loss set
        if not loss[k, i].any():
          np.testing.assert_array_equal(revealed[i], always[i])
          continue
        s = np.unique(grp[i][loss[k, i]])
        assert len(s) == 1, (k, i, s)  # one group
        np.testing.assert_array_equal(revealed[i], (grp[i] < s[0]) | always[i])
        in_group = cand[i] & (grp[i] == s[0])
        assert loss[k, i].sum() == np.ceil(fraction * in_group.sum() - 1e-3)
        if fraction == 1.0:
          np.testing.assert_array_equal(loss[k, i], in_group)


@pytest.mark.parametrize(
    "stage_kw",
    [
        dict(n_global=0, n_struct=1, n_refine=0, sketch_context="trajectory"),
        dict(n_global=0, n_struct=0, n_refine=1, refine_context="trajectory"),
    ],
)
def test_drawn_group_is_uniform_over_groups_with_a_candidate(stage_kw):
  """Over 600 step keys the drawn group of one image hits every group holding a candidate of the stage
  about equally often, and never a group without one."""
  cfg = _cfg(structure_ratio=0.25, **stage_kw)
  tokens, step, ent = rollout_record(7, b=2, n=24, t=T)
  is_s = _partition(step, ent, cfg)
  stage = rl.STAGE_STRUCT if stage_kw["n_struct"] else rl.STAGE_REFINE
  cand = np.asarray(rl.stage_candidates(stage, is_s))[0]
  holding = sorted(set(np.asarray(step)[0][cand].tolist()))
  assert len(holding) >= 2
  draw = jax.jit(jax.vmap(lambda key: rl.iteration_canvas(cfg, 0, key, tokens, step, is_s)[1][0]))
  loss = np.asarray(draw(jax.random.split(jax.random.key(0), 600)))
  drawn = np.array([np.unique(np.asarray(step)[0][m]).item() for m in loss])
  counts = np.array([(drawn == g).sum() for g in holding])
  assert counts.sum() == 600  # no draw outside the groups holding a candidate
  expect = 600 / len(holding)
  assert np.all(np.abs(counts - expect) < 0.3 * expect), (holding, counts)


def test_sketch_replay_is_tracegrpos_canvas_under_the_global_stage():
  """With only global iterations, the 'trajectory' sketch context is TraceGRPO's estimator exactly."""
  tokens, step, ent = rollout_record(3, b=4, t=T)
  kw = dict(n_global=3, n_struct=0, n_refine=0, trajectory_group=2, update_fraction=0.5)
  ht = _cfg(sketch_context="trajectory", **kw)
  trace = _cfg(estimator="trajectory", **kw)
  is_s = _partition(step, ent, ht)
  a = rl.all_canvases(ht, jax.random.key(1), tokens, step, is_s)
  b = rl.all_canvases(trace, jax.random.key(1), tokens, step, is_s)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_defaults_are_the_all_mask_and_structure_canvases():
  """sketch_context='all_mask', refine_context='structure' are the defaults, and under them every canvas
  and loss set is the one the estimator always drew: all-mask (S revealed in refine), and
  ``sample_update_set`` of the stage's candidates under the iteration's key."""
  cfg = _cfg(update_fraction=0.5)
  assert (rl.HTGRPOConfig().sketch_context, rl.HTGRPOConfig().refine_context) == ("all_mask", "structure")
  assert (rl.preset("htgrpo").sketch_context, rl.preset("htgrpo").refine_context) == ("all_mask", "structure")
  tokens, step, ent = rollout_record(5, b=4, t=T)
  is_s = _partition(step, ent, cfg)
  key = jax.random.key(9)
  canv, loss = rl.all_canvases(cfg, key, tokens, step, is_s)
  for k, stage in enumerate(rl.stage_schedule(1, 2, 2)):
    k_sel, _ = jax.random.split(jax.random.fold_in(key, k))
    want_loss = rl.sample_update_set(k_sel, rl.stage_candidates(stage, is_s), 0.5)
    want_canvas = jnp.where(is_s, tokens, MASK) if stage == rl.STAGE_REFINE else jnp.full_like(tokens, MASK)
    np.testing.assert_array_equal(loss[k], want_loss)
    np.testing.assert_array_equal(canv[k], want_canvas)


def test_canvas_groups_with_replayed_stages():
  """Replayed iterations each get their own canvas; shared kinds (all-mask, S-revealed) stay shared."""
  groups = lambda **kw: rl.canvas_groups(rl.preset("htgrpo", **kw))
  assert groups() == (0, 0, 0, 0, 1, 1)
  assert groups(sketch_context="trajectory") == (0, 1, 2, 3, 4, 4)
  assert groups(sketch_context="trajectory", refine_context="none") == (0, 1, 2, 3, 4, 4)
  assert groups(refine_context="trajectory") == (0, 0, 0, 0, 1, 2)
  assert groups(sketch_context="trajectory", refine_context="trajectory") == tuple(range(6))
  assert groups(n_global=0, refine_context="trajectory") == (0, 0, 1, 2)


B, N, C, G = 8, 12, 4, 4


@pytest.mark.parametrize(
    "sketch_ctx,refine_ctx",
    [("trajectory", "structure"), pytest.param("all_mask", "trajectory", marks=pytest.mark.slow)],
)
def test_step_scores_each_iteration_on_its_own_canvas(sketch_ctx, refine_ctx):
  """With a zero learning rate the policy never moves, so every iteration's ratio is exactly 1 and its
  k3-KL exactly 0 only if the old and reference passes scored that iteration's own canvas: a replayed
  canvas shared by mistake with another iteration (or a shared one split) would show here."""
  model = ToyPolicy(C, N, dim=8)
  ro = random_rollout(np.random.default_rng(1), B, N, C, T, lp=2)
  params = model.init(jax.random.key(0), ro.prompt_tokens, ro.image_tokens)["params"]
  cfg = rl.HTGRPOConfig(
      group_size=G,
      num_sampler_steps=T,
      n_global=1,
      n_struct=2,
      n_refine=2,
      beta=0.05,
      sketch_context=sketch_ctx,
      refine_context=refine_ctx,
  )
  opt = optax.sgd(0.0)
  step = rl.make_train_step(linen_logits_fn(model), opt, cfg, donate=False)
  _, met = step(rl.TrainState.create(params, opt), ro, jax.random.key(2))
  it = met["iter"]
  np.testing.assert_array_equal(np.asarray(it["ratio_min"]), 1.0)
  np.testing.assert_array_equal(np.asarray(it["ratio_max"]), 1.0)
  np.testing.assert_array_equal(np.asarray(it["kl"]), 0.0)
  assert np.all(np.asarray(it["tokens"]) > 0)
  # The replayed iterations' canvases do differ from one another (else the check above proves little).
  sets = update_sets(cfg, ro, jax.random.fold_in(jax.random.key(2), 0))
  replayed = [k for k, g in enumerate(rl.canvas_groups(cfg)) if rl.canvas_groups(cfg).count(g) == 1]
  assert len(replayed) >= 2
  assert not np.array_equal(np.asarray(sets.canvases[replayed[0]]), np.asarray(sets.canvases[replayed[1]]))


def test_struct_gradient_is_nonzero_on_replayed_canvases():
  """The struct stage learns under the trajectory sketch context: a non-zero gradient on toy rollouts from
  a sampler that records its trajectory (the all-mask context gives 1.4 on the same rollouts, seed 0;
  test_hierarchical_groups.py)."""
  replayed = struct_grad_norm(None, 1, sketch_context="trajectory")
  print(f"struct-stage grad norm, trajectory sketch context: {replayed:.4g}")
  assert replayed > 0.1
