"""The non-finite guard of the compiled step covers the *update*: an infinite learning rate, a NaN
weight decay or a huge finite gradient without clipping would write non-finite params or optimizer
moments; the step keeps the old ones instead, counts the skip, and a later clean update trains."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from htgrpo_jax import rl

B, N, C, T, G, LP = 8, 8, 4, 4, 4, 2


def _logits_fn(scale: float):
  """A canvas policy with O(1) logits whose gradient wrt ``w`` is ``scale`` times an ordinary one:
  with scale 1e22 the gradient (~1e20) is finite but its square overflows float32 (~3e38)."""

  def fn(params, prompt, canvas):
    onehot = jax.nn.one_hot(jnp.where(canvas < 0, C, canvas), C + 1)  # [B, N, C+1]
    ctx = params["prompt"][prompt].mean(1)[:, None, :]  # [B, 1, C]
    return onehot @ (params["w"] * scale) + params["pos"][None] + ctx  # [B, N, C]

  return fn


def _setup(scale: float = 1.0):
  rng = np.random.default_rng(0)
  k = jax.random.split(jax.random.key(0), 3)
  params = {
      "w": jax.random.normal(k[0], (C + 1, C)) * (0.1 / scale),
      "pos": jax.random.normal(k[1], (N, C)) * 0.1,
      "prompt": jax.random.normal(k[2], (16, C)) * 0.1,
  }
  commit = np.stack([rng.permutation(np.repeat(np.arange(T), N // T)) for _ in range(B)])
  ro = rl.Rollout(
      prompt_tokens=jnp.asarray(rng.integers(0, 16, (B, LP)), jnp.int32),
      image_tokens=jnp.asarray(rng.integers(0, C, (B, N)), jnp.int32),
      commit_step=jnp.asarray(commit, jnp.int32),
      commit_entropy=jnp.asarray(rng.uniform(0, 1, (B, N)), jnp.float32),
      commit_logp=jnp.asarray(-rng.uniform(0, 2, (B, N)), jnp.float32),
      rewards=jnp.asarray(rng.uniform(0, 1, (B,)), jnp.float32),
  )
  cfg = rl.HTGRPOConfig(group_size=G, num_sampler_steps=T, n_global=1, n_struct=1, n_refine=1, beta=0.0)
  return params, ro, cfg


def _finite(tree):
  return all(
      bool(np.all(np.isfinite(np.asarray(x))))
      for x in jax.tree.leaves(tree)
      if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
  )


@pytest.mark.parametrize(
    "case",
    [
        "lr_inf",
        pytest.param("weight_decay_nan", marks=pytest.mark.slow),
        pytest.param("huge_gradient_no_clip", marks=pytest.mark.slow),
    ],
)
def test_nonfinite_update_is_skipped_and_counted(case):
  scale = 1e22 if case == "huge_gradient_no_clip" else 1.0
  params, ro, cfg = _setup(scale)
  opt = {
      "lr_inf": lambda: rl.make_optimizer(float("inf"), clip_norm=None),
      "weight_decay_nan": lambda: rl.make_optimizer(1e-2, weight_decay=float("nan")),
      "huge_gradient_no_clip": lambda: rl.make_optimizer(1e-2, clip_norm=None),
  }[case]()
  step = rl.make_train_step(_logits_fn(scale), opt, cfg, donate=False)
  state0 = rl.TrainState.create(params, opt, with_reference=False)
  state, met = step(state0, ro, jax.random.key(1))
  k = cfg.num_iterations
  # The loss (and, but for the overflowing norm of the huge one, the gradient) was finite: only the
  # update was not.
  assert np.all(np.isfinite(met["iter"]["loss"]))
  if scale == 1.0:
    assert np.all(np.isfinite(met["iter"]["grad_norm"]))
  assert int(met["skipped"]) == k == int(state.skipped) == int(met["skipped_total"])
  assert _finite(state.params) and _finite(state.opt_state)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(state0.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The same state then trains with a sane optimizer: nothing was poisoned.
  good = rl.make_optimizer(1e-2)
  step2 = rl.make_train_step(_logits_fn(1.0), good, cfg, donate=False)
  if scale != 1.0:
    state = state.replace(params=dict(state.params, w=state.params["w"] * scale))
  s2, met2 = step2(rl.TrainState.create(state.params, good, with_reference=False), ro, jax.random.key(2))
  assert int(met2["skipped"]) == 0 and _finite(s2.params)
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(params))) > 0


def test_finite_updates_are_untouched_by_the_guard():
  """The guard selects, it does not perturb: a clean step equals the unguarded optax update."""
  params, ro, cfg = _setup()
  cfg = rl.HTGRPOConfig(group_size=G, num_sampler_steps=T, n_global=1, n_struct=0, n_refine=0, beta=0.0)
  opt = optax.sgd(0.5)
  step = rl.make_train_step(_logits_fn(1.0), opt, cfg, donate=False)
  state, met = step(rl.TrainState.create(params, opt, with_reference=False), ro, jax.random.key(1))
  assert int(met["skipped"]) == 0
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params))) > 0
