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


def _spread_record(b=6, n=16, t=8):
  """commit_step int32[b, n] where S (the first 4 tokens of every image) sits in 1, 2, 4, ... distinct
  sampler steps depending on the image; R fills the other steps. Returns (commit_step, is_s, groups)."""
  step = np.zeros((b, n), np.int32)
  is_s = np.zeros((b, n), bool)
  is_s[:, :4] = True
  spread = [1, 2, 4, 1, 2, 4][:b]
  for i, g in enumerate(spread):
    step[i, :4] = np.arange(4) % g  # S over g groups
    step[i, 4:] = np.arange(n - 4) % t
  return jnp.asarray(step), jnp.asarray(is_s), np.asarray(spread, np.float32)


def test_replay_correction_counts_every_candidate_once_in_expectation():
  """The struct stage replays one group per image among those holding an S token: an image whose S sits
  in n_b groups has, on average, |S| / n_b tokens in the loss. Weighted by ``replay_weights`` every
  image's expected weighted loss-set size is the same (each S token counts once, up to the common
  normalisation); without the correction it falls as 1 / n_b, the tilt docs/findings.md section 17
  measures."""
  step, is_s, spread = _spread_record()
  tokens = jnp.zeros_like(step)
  sizes = {False: [], True: []}
  for corr in (False, True):
    cfg = rl.HTGRPOConfig(
        group_size=2,
        num_sampler_steps=8,
        n_global=0,
        n_struct=1,
        n_refine=0,
        sketch_context="trajectory",
        replay_correction=corr,
    )
    for seed in range(300):
      _, loss = rl.all_canvases(cfg, jax.random.key(seed), tokens, step, is_s)
      w = rl.replay_weights(cfg, step, is_s, loss)
      sizes[corr].append(np.asarray(loss[0].sum(-1) * w[0]))
  raw, fixed = (np.mean(sizes[c], axis=0) for c in (False, True))
  np.testing.assert_allclose(raw, 4.0 / spread, rtol=0.15)  # the uncorrected tilt toward few groups
  np.testing.assert_allclose(fixed / fixed.mean(), 1.0, atol=0.12)


def test_replay_weights_mean_one_over_loss_tokens_and_ones_elsewhere():
  """The weights keep the token-mean loss's scale (mean 1 over each replaying iteration's loss tokens);
  every iteration that does not replay, and every iteration without the correction, weighs exactly 1."""
  step, is_s, _ = _spread_record()
  tokens = jnp.zeros_like(step)
  base = dict(group_size=2, num_sampler_steps=8, n_global=1, n_struct=2, n_refine=1)
  cfg = rl.HTGRPOConfig(**base, sketch_context="trajectory", replay_correction=True)
  _, loss = rl.all_canvases(cfg, jax.random.key(0), tokens, step, is_s)
  w = np.asarray(rl.replay_weights(cfg, step, is_s, loss))
  loss = np.asarray(loss)
  for k, stage in enumerate(rl.stage_schedule(1, 2, 1)):
    if stage == rl.STAGE_REFINE:  # refine_context 'structure' does not replay
      np.testing.assert_array_equal(w[k], 1.0)
    else:
      size = loss[k].sum(-1)
      assert abs((w[k] * size).sum() / size.sum() - 1.0) < 1e-6
  assert not np.allclose(w[1], 1.0)  # the struct iteration's weights do vary here
  for off in (
      rl.HTGRPOConfig(**base, sketch_context="trajectory"),  # the default: no correction
      rl.HTGRPOConfig(**base, replay_correction=True),  # all-mask sketch canvases: nothing replays
      rl.HTGRPOConfig(**{**base, "n_struct": 0}, estimator="random_remask", replay_correction=True),
  ):
    _, loss = rl.all_canvases(off, jax.random.key(0), tokens, step, is_s)
    np.testing.assert_array_equal(np.asarray(rl.replay_weights(off, step, is_s, loss)), 1.0)


def test_replay_correction_changes_the_update_only_when_on():
  """On toy rollouts the corrected step differs from the uncorrected one, which is bit for bit the step
  without the option (the weights are exactly 1); a non-bool value is refused by name."""
  model = ToyPolicy(4, 8, dim=8)
  ro = random_rollout(np.random.default_rng(3), 8, 8, 4, T, lp=2)
  params = model.init(jax.random.key(0), ro.prompt_tokens, ro.image_tokens)["params"]
  opt = optax.sgd(0.1)
  outs = {}
  for corr in (False, True):
    cfg = _cfg(group_size=4, sketch_context="trajectory", replay_correction=corr, beta=0.0)
    step = rl.make_train_step(linen_logits_fn(model), opt, cfg, donate=False)
    outs[corr], _ = step(rl.TrainState.create(params, opt, with_reference=False), ro, jax.random.key(1))
  plain = rl.make_train_step(
      linen_logits_fn(model), opt, _cfg(group_size=4, sketch_context="trajectory", beta=0.0), donate=False
  )
  ref, _ = plain(rl.TrainState.create(params, opt, with_reference=False), ro, jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, outs[False].params, ref.params)
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), outs[True].params, outs[False].params))
  assert max(diffs) > 0
  with pytest.raises(ValueError, match="replay_correction"):
    _cfg(replay_correction=1)
