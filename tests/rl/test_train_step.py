"""The compiled HT-GRPO step: invariants, an independent gradient reference, NaN skipping, Linen/NNX
models, and a 2x2x2 (data, fsdp, tensor) mesh against one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from htgrpo_jax import parallel, rl
from tests.helpers.rl_toy import NNXToyPolicy, ToyPolicy, linen_logits_fn, random_rollout
from tests.helpers.rl_reference import np_credit, np_group_advantages, np_partition

B, N, C, T, G = 8, 8, 4, 4, 4


@pytest.fixture(scope="module")
def toy():
  model = ToyPolicy(C, N, dim=8)
  ro = random_rollout(np.random.default_rng(0), B, N, C, T, lp=2)
  ro = ro.replace(prompt_tokens=ro.prompt_tokens % 13)  # token 13 is the NaN trigger below
  params = model.init(jax.random.key(0), ro.prompt_tokens, ro.image_tokens)["params"]
  return model, params, ro


def _cfg(**kw):
  base = dict(group_size=G, num_sampler_steps=T, n_global=1, n_struct=0, n_refine=1, beta=0.05)
  return rl.HTGRPOConfig(**{**base, **kw})


def _tree_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


@pytest.mark.parametrize(
    "estimator",
    [
        "htgrpo",
        "random_remask",
        pytest.param("trajectory", marks=pytest.mark.slow),
        pytest.param("uni", marks=pytest.mark.slow),
    ],
)
def test_first_iteration_ratio_is_one_and_kl_zero(toy, estimator):
  """Old, reference and current passes of k=0 see the same canvas: rho == 1 and k3-KL == 0 exactly."""
  model, params, ro = toy
  opt = rl.make_optimizer(3e-2)
  step = rl.make_train_step(linen_logits_fn(model), opt, _cfg(estimator=estimator), donate=False)
  state, met = step(rl.TrainState.create(params, opt), ro, jax.random.key(3))
  it = met["iter"]
  assert float(it["ratio_min"][0]) == 1.0 and float(it["ratio_max"][0]) == 1.0
  assert float(it["kl"][0]) == 0.0 and float(it["tokens"][0]) > 0
  # After one update the policy moved, so the second iteration's ratio is no longer 1.
  assert float(it["ratio_max"][1] - it["ratio_min"][1]) > 1e-4
  assert int(state.step) == 1 and int(met["skipped"]) == 0
  assert set(met) >= {"total", "global", "refine", "iter", "reward_mean", "skipped_total"}


@pytest.mark.parametrize("micro_batch_size", [None, 2])
def test_step_matches_independent_gradient(toy, micro_batch_size):
  """K=1, SGD(lr=1): the update equals -grad of -mean_ij(A_i w_ij log pi(x_ij | prompt, all-mask)),
  with A, S and w from the NumPy references (at rho == 1 and ref == params the clip and KL terms have
  zero slope). Micro-batching must not change it."""
  model, params, ro = toy
  cfg = _cfg(
      n_refine=0,
      update_schedule="constant",
      update_fraction=1.0,
      structure_weight=3.0,
      refine_weight=0.5,
      sketch_fraction=0.5,
      structure_ratio=0.25,
      micro_batch_size=micro_batch_size,
  )
  opt = optax.sgd(1.0)
  step = rl.make_train_step(linen_logits_fn(model), opt, cfg, donate=False)
  state, _ = step(rl.TrainState.create(params, opt), ro, jax.random.key(0))

  adv = np_group_advantages(np.asarray(ro.rewards), G, cfg.adv_eps, 1)
  is_s = np_partition(np.asarray(ro.commit_step), np.asarray(ro.commit_entropy), T, 0.5, 0.25, "entropy")
  w = np_credit(is_s, 3.0, 0.5, True)
  coef = jnp.asarray(adv[:, None] * w / (B * N), jnp.float32)

  def ref_loss(p):
    logits = model.apply({"params": p}, ro.prompt_tokens, jnp.full((B, N), rl.MASK, jnp.int32))
    logp = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(logp, ro.image_tokens[..., None], -1)[..., 0]
    return -(coef * picked).sum()

  want = jax.tree.map(lambda p, g: p - g, params, jax.grad(ref_loss)(params))
  _tree_close(state.params, want, rtol=2e-5, atol=2e-6)


def test_zero_advantage_zero_gradient_and_nonfinite_skip(toy):
  model, params, ro = toy

  def logits_fn(p, prompt, canvas):  # NaN logits for any image whose prompt starts with token 13
    bad = jnp.where(prompt[:, 0] == 13, jnp.nan, 0.0)[:, None, None]
    return model.apply({"params": p}, prompt, canvas) + bad

  cfg = _cfg(beta=0.0, n_struct=1)
  opt = optax.sgd(0.1)
  step = rl.make_train_step(logits_fn, opt, cfg, donate=False)
  state0 = rl.TrainState.create(params, opt, with_reference=False)
  # Zero advantages (constant rewards per group) and beta = 0: exactly zero gradient, params unchanged.
  flat = ro.replace(rewards=jnp.repeat(jnp.arange(B // G, dtype=jnp.float32), G))
  s1, met = step(state0, flat, jax.random.key(0))
  assert np.all(np.asarray(met["iter"]["grad_norm"]) == 0.0)
  _tree_close(s1.params, params, rtol=0, atol=0)
  # A NaN in the logits: every inner update is skipped, params and opt state stay finite and unchanged.
  poisoned = ro.replace(prompt_tokens=ro.prompt_tokens.at[0, 0].set(13))
  s2, met = step(s1, poisoned, jax.random.key(0))
  assert int(met["skipped"]) == cfg.num_iterations == int(s2.skipped)
  assert not np.isfinite(float(met["total"]["loss"]))
  _tree_close(s2.params, params, rtol=0, atol=0)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(s2.params))
  # A clean batch afterwards trains again.
  s3, met = step(s2, ro, jax.random.key(0))
  assert int(met["skipped"]) == 0 and int(s3.skipped) == cfg.num_iterations
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(s3.params), jax.tree.leaves(params))) > 0


@pytest.mark.slow
def test_linen_and_nnx_models_agree(toy):
  """The same weights as a Linen module and as an NNX module (through nnx.split/merge) give one result."""
  model, params, ro = toy
  graphdef, nstate = nnx.split(NNXToyPolicy(C, N, dim=8, rngs=nnx.Rngs(0)))
  nnx.replace_by_pure_dict(nstate, jax.tree.map(jnp.copy, params))  # copies: the steps below donate
  nnx_fn = lambda st, prompt, canvas: nnx.merge(graphdef, st)(prompt, canvas)
  cfg = _cfg(n_struct=1)
  opt = rl.make_optimizer(1e-2, weight_decay=0.01)
  s_linen, m_linen = rl.make_train_step(linen_logits_fn(model), opt, cfg)(
      rl.TrainState.create(jax.tree.map(jnp.copy, params), opt), ro, jax.random.key(5)
  )
  s_nnx, m_nnx = rl.make_train_step(nnx_fn, opt, cfg)(rl.TrainState.create(nstate, opt), ro, jax.random.key(5))
  _tree_close(nnx.to_pure_dict(s_nnx.params), s_linen.params, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(m_nnx["total"]["loss"]), float(m_linen["total"]["loss"]), rtol=1e-5)
  assert float(m_nnx["iter"]["ratio_max"][1]) != 1.0  # it really trained


def _shard_rule(mesh, x):
  """FSDP x tensor for matrices, tensor for even vectors, replicated otherwise."""
  shp = np.shape(x)
  if len(shp) == 2 and shp[0] % 2 == 0 and shp[1] % 2 == 0:
    return NamedSharding(mesh, P("fsdp", "tensor"))
  if len(shp) == 1 and shp[0] % 2 == 0:
    return NamedSharding(mesh, P("tensor"))
  return NamedSharding(mesh, P())


def test_mesh_2x2x2_matches_single_device(toy):
  """Sharded (and micro-batched) on data x fsdp x tensor = 2x2x2 vs one device, whole batch."""
  model, params, ro = toy
  cfg = _cfg(n_struct=1, micro_batch_size=4)
  opt = rl.make_optimizer(1e-2)
  fn = linen_logits_fn(model)
  s_one, m_one = rl.make_train_step(fn, opt, _cfg(n_struct=1), donate=False)(
      rl.TrainState.create(params, opt), ro, jax.random.key(7)
  )
  mesh = parallel.make_mesh(2, 2, 2)
  state = rl.TrainState.create(jax.tree.map(jnp.copy, params), opt)
  shardings = jax.tree.map(lambda x: _shard_rule(mesh, x), state)
  state = jax.device_put(state, shardings)
  step = rl.make_train_step(fn, opt, cfg, mesh=mesh, state_shardings=shardings)
  s_mesh, m_mesh = step(state, parallel.shard_batch(ro, mesh), jax.random.key(7))
  assert s_mesh.params["mix"]["kernel"].sharding.spec == P("fsdp", "tensor")
  _tree_close(s_mesh.params, s_one.params, rtol=1e-5, atol=1e-6)
  _tree_close(m_mesh["total"], m_one["total"], rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_before_compiling(toy):
  model, params, ro = toy
  opt = rl.make_optimizer(1e-2)
  step = rl.make_train_step(linen_logits_fn(model), opt, _cfg(micro_batch_size=4), donate=False)
  state = rl.TrainState.create(params, opt)
  six = jax.tree.map(lambda x: x[:6], ro)
  with pytest.raises(ValueError, match="group_size=4 must divide the batch size 6"):
    step(state, six, jax.random.key(0))
  with pytest.raises(ValueError, match="Rollout.commit_entropy"):
    step(state, ro.replace(commit_entropy=ro.commit_entropy.astype(jnp.float16)), jax.random.key(0))
  with pytest.raises(ValueError, match="ref_params"):
    step(rl.TrainState.create(params, opt, with_reference=False), ro, jax.random.key(0))
  with pytest.raises(ValueError, match="HTGRPOConfig.n_refine"):
    _cfg(n_refine=-1)
  assert step.jitted._cache_size() == 0  # nothing was traced or compiled


def test_entropy_coef_reaches_the_compiled_step(toy):
  """HTGRPOConfig.entropy_coef is wired into the step: rewards equal within every group (zero
  advantage) and no KL, so the coefficient is the only thing that moves the policy. At 0 the step
  leaves the params as they were; at 0.5 it raises the entropy the step logs on its next call."""
  model, params, ro = toy
  flat = ro.replace(rewards=jnp.ones_like(ro.rewards))
  opt = optax.sgd(0.5)
  states = {}
  for coef in (0.0, 0.5):
    step = rl.make_train_step(linen_logits_fn(model), opt, _cfg(beta=0.0, entropy_coef=coef), donate=False)
    s0 = rl.TrainState.create(params, opt, with_reference=False)
    s1, m1 = step(s0, flat, jax.random.key(2))
    _, m2 = step(s1, flat, jax.random.key(2))
    states[coef] = (s1, float(m1["total"]["entropy"]), float(m2["total"]["entropy"]))
  jax.tree.map(np.testing.assert_array_equal, states[0.0][0].params, params)
  _, before, after = states[0.5]
  assert after > before + 1e-3, (before, after)
