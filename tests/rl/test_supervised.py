"""The supervised term of the update (``HTGRPOConfig.ptx_coef``, ``rl.supervised``): its gradient
against an independent one, that it is off at 0, that bad batches are refused, and that it runs on a
mesh and through the trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from htgrpo_jax import parallel, rl
from htgrpo_jax.rl import train_step as ts
from tests.helpers.rl_toy import ToyPolicy, linen_logits_fn, random_rollout

B, N, C, T, G = 8, 8, 4, 4, 4
P = B // G


@pytest.fixture(scope="module")
def toy():
  model = ToyPolicy(C, N, dim=8)
  rng = np.random.default_rng(0)
  ro = random_rollout(rng, B, N, C, T, lp=2)
  params = model.init(jax.random.key(0), ro.prompt_tokens, ro.image_tokens)["params"]
  sup = rl.SupervisedBatch(
      prompt_tokens=jnp.asarray(ro.prompt_tokens[::G]), codes=jnp.asarray(rng.integers(0, C, (P, N)), jnp.int32)
  )
  return model, params, ro, sup


def _cfg(**kw):
  base = dict(group_size=G, num_sampler_steps=T, n_global=1, n_struct=0, n_refine=0, beta=0.0)
  return rl.HTGRPOConfig(**{**base, **kw})


def test_supervised_gradient_matches_an_independent_one(toy):
  """K = 1, SGD(lr=1), rewards equal within every group (advantage 0, no KL): the update is exactly
  -ptx_coef x the gradient of the mean cross-entropy of the true codes at the slots the step masks
  (computed here with optax on the same mask), so the term is neither dropped nor mis-weighted."""
  model, params, ro, sup = toy
  flat = ro.replace(rewards=jnp.ones_like(ro.rewards))
  coef = 0.7
  opt = optax.sgd(1.0)
  step = rl.make_train_step(linen_logits_fn(model), opt, _cfg(ptx_coef=coef), donate=False)
  key = jax.random.key(5)
  state, met = step(rl.TrainState.create(params, opt, with_reference=False), flat, key, sup)

  mask_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 0), 0), ts._PTX_SALT)
  canvas, masked = rl.mask_canvas(sup.codes, mask_key)

  def nll(p):
    logits = model.apply({"params": p}, sup.prompt_tokens, canvas)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), sup.codes)
    return jnp.sum(ce * masked) / jnp.sum(masked)

  loss, grad = jax.value_and_grad(nll)(params)
  expected = jax.tree.map(lambda p, g: p - coef * g, params, grad)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state.params, expected)
  np.testing.assert_allclose(float(met["total"]["ptx_loss"]), float(loss), rtol=1e-5)
  assert float(met["total"]["loss"]) == 0.0  # the policy-gradient part is flat here


def test_supervised_term_lowers_the_ground_truth_loss(toy):
  """Advantage 0, ptx on: three steps of Adam raise the likelihood of the ground truth; ptx off:
  the params do not move (the policy-gradient part is flat)."""
  model, params, ro, sup = toy
  flat = ro.replace(rewards=jnp.ones_like(ro.rewards))
  canvas = jnp.full_like(sup.codes, rl.MASK)

  def nll(p):
    logits = model.apply({"params": p}, sup.prompt_tokens, canvas)
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, sup.codes).mean())

  opt = rl.make_optimizer(3e-2)
  for coef, moves in ((1.0, True), (0.0, False)):
    step = rl.make_train_step(linen_logits_fn(model), opt, _cfg(ptx_coef=coef, n_global=3), donate=False)
    state = rl.TrainState.create(params, opt, with_reference=False)
    for i in range(3):
      state, _ = step(state, flat, jax.random.key(i), sup)
    if moves:
      assert nll(state.params) < nll(params) - 0.05
    else:
      jax.tree.map(np.testing.assert_array_equal, state.params, params)


def test_zero_coefficient_ignores_a_batch_and_changes_nothing(toy):
  """ptx_coef = 0 (the default): a batch passed anyway is dropped, and the step equals the step
  without one, bit for bit."""
  model, params, ro, sup = toy
  opt = rl.make_optimizer(3e-2)
  step = rl.make_train_step(linen_logits_fn(model), opt, _cfg(beta=0.05, n_refine=1), donate=False)
  s0 = rl.TrainState.create(params, opt)
  a, ma = step(s0, ro, jax.random.key(1))
  b, mb = step(s0, ro, jax.random.key(1), sup)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  assert "ptx_loss" not in ma["total"] and float(ma["total"]["loss"]) == float(mb["total"]["loss"])


@pytest.mark.parametrize(
    "bad, match",
    [
        (None, "ptx_coef=0.5 > 0 but the step got no supervised batch"),
        ("rows", "prompt_tokens has 2 rows but codes has 1"),
        ("len", "SupervisedBatch.prompt_tokens has length 3; the rollouts' prompts have 2"),
        ("tokens", "SupervisedBatch.codes has 7 image tokens; the rollouts have 8"),
        ("float", r"SupervisedBatch.codes must be an int32\[P, ...\] array"),
        ("mask", "SupervisedBatch.codes holds a negative code or MASK"),
    ],
)
def test_bad_supervised_batches_are_refused_before_compiling(toy, bad, match):
  model, params, ro, sup = toy
  batch = {
      None: None,
      "rows": sup._replace(codes=sup.codes[:1]),
      "len": sup._replace(prompt_tokens=jnp.zeros((P, 3), jnp.int32)),
      "tokens": sup._replace(codes=sup.codes[:, :7]),
      "float": sup._replace(codes=sup.codes.astype(jnp.float32)),
      "mask": sup._replace(codes=sup.codes.at[0, 0].set(rl.MASK)),
  }[bad]
  opt = rl.make_optimizer(3e-2)
  step = rl.make_train_step(linen_logits_fn(model), opt, _cfg(ptx_coef=0.5), donate=False)
  with pytest.raises(ValueError, match=match):
    step(rl.TrainState.create(params, opt, with_reference=False), ro, jax.random.key(0), batch)


def test_ptx_coef_must_be_finite_and_non_negative():
  for v in (-0.1, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="HTGRPOConfig.ptx_coef"):
      _cfg(ptx_coef=v)


def test_supervised_step_on_a_mesh_matches_one_device(toy):
  """The batch is replicated on a (data 4, fsdp 2) mesh; the sharded step equals the unsharded one."""
  model, params, ro, sup = toy
  opt = rl.make_optimizer(3e-2)
  cfg = _cfg(ptx_coef=1.0, n_global=2)
  one = rl.make_train_step(linen_logits_fn(model), opt, cfg, donate=False)
  a, ma = one(rl.TrainState.create(params, opt, with_reference=False), ro, jax.random.key(2), sup)
  mesh = parallel.make_mesh(data=4, fsdp=2, tensor=1)
  sharded = rl.make_train_step(linen_logits_fn(model), opt, cfg, mesh=mesh, donate=False)
  on_mesh = rl.SupervisedBatch(*(parallel.global_replicated(np.asarray(x), mesh) for x in sup))
  b, mb = sharded(rl.TrainState.create(params, opt, with_reference=False), ro, jax.random.key(2), on_mesh)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6), a.params, b.params)
  np.testing.assert_allclose(float(ma["total"]["ptx_loss"]), float(mb["total"]["ptx_loss"]), rtol=1e-5)


def test_supervised_step_lowers_on_abstract_inputs(toy):
  """AOT pre-flight (``aot.lower_train_step``) lowers the step on ShapeDtypeStructs, batch included."""
  model, params, ro, sup = toy
  opt = rl.make_optimizer(3e-2)
  step = rl.make_train_step(linen_logits_fn(model), opt, _cfg(ptx_coef=1.0), donate=False)
  abstract = rl.SupervisedBatch(*(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in sup))
  state = rl.TrainState.create(params, opt, with_reference=False)
  assert step.lower(state, ro, jax.random.key(0), abstract).compile() is not None


@pytest.mark.parametrize("ptx_coef", [0.0, 1.0])
def test_an_aot_compiled_step_is_called_like_the_step(toy, ptx_coef):
  """``step.lower(state, rollout, key).compile()`` takes the step's own arguments (the supervised
  batch only with the term) and gives the jitted step's result, bit for bit; a missing batch is
  refused by name, as by the step. (The program has a supervised slot either way: a bare
  ``jax.stages.Compiled`` made bench/train_step.py pass ``None``, and it broke when it did not.)"""
  model, params, ro, sup = toy
  opt = rl.make_optimizer(3e-2)
  step = rl.make_train_step(linen_logits_fn(model), opt, _cfg(ptx_coef=ptx_coef), donate=False)
  s0 = rl.TrainState.create(params, opt, with_reference=False)
  extra = (sup,) if ptx_coef else ()
  compiled = step.lower(s0, ro, jax.random.key(1), *extra).compile()
  assert compiled.cost_analysis() is not None and "HloModule" in compiled.as_text()
  a, _ = compiled(s0, ro, jax.random.key(1), *extra)
  b, _ = step(s0, ro, jax.random.key(1), *extra)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  if ptx_coef:
    with pytest.raises(ValueError, match="got no supervised batch"):
      compiled(s0, ro, jax.random.key(1))
