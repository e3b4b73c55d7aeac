"""htgrpo_jax.flops against the traced programs themselves, not against its own formula.

Every matmul of a program is a ``dot_general`` in its jaxpr; the count below walks the whole jaxpr
(nested jits, scans times their length, both branches of a cond taking the larger) and adds
2 x |output| x |contracted dims| per dot_general. The policy forward, a whole RL train step
(old / reference passes, K forward+backward updates, micro-batch scan) and a whole sampler call are
traced as the trainer builds them, with no rematerialisation (model FLOPs exclude it). A second,
coarser check compares one forward with XLA's own ``cost_analysis()`` on CPU.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htgrpo_jax import aot, flops, rl, tasks
from htgrpo_jax.models import llada, policy
from htgrpo_jax.sampling import SamplerConfig, guided_canvas_logits_fn, make_sampler


def _subjaxprs(value):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _subjaxprs(v)


def dot_flops(jaxpr) -> float:
  """Matmul FLOPs of every dot_general a jaxpr runs."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lc)
      continue
    if name == "while":
      inner = sum(dot_flops(j) for j in _subjaxprs(eqn.params["body_jaxpr"]))
      assert inner == 0, "a while loop with matmuls: trip count unknown to this counter"
      continue
    subs = [dot_flops(j) for v in eqn.params.values() for j in _subjaxprs(v)]
    if not subs:
      continue
    if name == "cond":
      total += max(subs)
    elif name == "scan":
      total += eqn.params["length"] * sum(subs)
    else:  # pjit, custom_jvp / custom_vjp calls, shard_map, ...: run once
      total += sum(subs)
  return total


def traced_flops(fn, *args) -> float:
  return dot_flops(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.fixture(scope="module")
def shapes_model():
  """The tiny ShapeEval config's model and layout (aot.build_model: no world built), resized so
  every term of the count has a different size: d=48, 2 layers, mlp 80, L=80, N=64, C=128."""
  config = tasks.load_config_file("configs/geneval.py", "htgrpo,tiny")
  config.model.overrides.update(d_model=48, n_layers=2, n_heads=2, mlp_hidden=80)
  cfg, layout, _ = aot.build_model(config)
  return dataclasses.replace(cfg, remat="none"), layout


def _inputs(layout, rows, seed=0):
  rng = np.random.default_rng(seed)
  prompts = jnp.asarray(rng.integers(1, 10, (rows, layout.prompt_length)), jnp.int32)
  canvas = jnp.asarray(rng.integers(0, layout.codebook_size, (rows, layout.num_image_tokens)), jnp.int32)
  return prompts, canvas


@pytest.mark.parametrize("scan_layers", [False, True])
def test_forward_flops_equal_the_forwards_matmuls(shapes_model, scan_layers):
  cfg, layout = shapes_model
  cfg = dataclasses.replace(cfg, scan_layers=scan_layers)
  fn = policy.make_canvas_logits_fn(cfg, layout)
  params = policy.abstract_params(cfg, layout)
  prompts, canvas = _inputs(layout, 3)
  counted = traced_flops(fn, params, prompts, canvas)
  assert counted > 0
  assert flops.forward_flops(cfg, layout, 3) == pytest.approx(counted, rel=1e-12)


def test_forward_flops_agree_with_xla_cost_analysis_on_cpu(shapes_model):
  """XLA counts every op (norms, softmax, RoPE, gathers too): the matmuls are most of it, not all."""
  cfg, layout = shapes_model
  cfg = dataclasses.replace(cfg, scan_layers=False, dtype=jnp.float32)
  fn = policy.make_canvas_logits_fn(cfg, layout)
  params = policy.abstract_params(cfg, layout)
  prompts, canvas = _inputs(layout, 4)
  cost = jax.jit(fn).lower(params, prompts, canvas).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ours = flops.forward_flops(cfg, layout, 4)
  assert ours <= cost["flops"] <= 1.25 * ours, (ours, cost["flops"])


def _rollout(layout, rows, steps, seed=0):
  rng = np.random.default_rng(seed)
  n = layout.num_image_tokens
  prompts, codes = _inputs(layout, rows, seed)
  order = np.stack([rng.permutation(np.arange(n) * steps // n) for _ in range(rows)])
  return rl.Rollout(
      prompt_tokens=prompts,
      image_tokens=codes,
      commit_step=jnp.asarray(order, jnp.int32),
      commit_entropy=jnp.asarray(rng.uniform(0, 3, (rows, n)), jnp.float32),
      commit_logp=jnp.asarray(-rng.uniform(0, 3, (rows, n)), jnp.float32),
      rewards=jnp.asarray(rng.random(rows), jnp.float32),
  )


@pytest.mark.parametrize(
    "estimator, beta, micro_batch, guidance, sketch_context",
    [
        ("htgrpo", 0.01, None, "none", "all_mask"),  # 2 distinct canvases: old + reference on each
        ("htgrpo", 0.0, 4, "none", "all_mask"),  # no reference pass; the micro-batch scan
        ("random_remask", 0.01, None, "none", "all_mask"),  # a fresh canvas per iteration
        ("htgrpo", 0.01, None, "guided", "all_mask"),  # every pass on conditional + unconditional rows
        ("htgrpo", 0.01, None, "none", "trajectory"),  # 3 replayed global/struct canvases + 1 shared refine
    ],
)
def test_train_step_flops_equal_the_programs_matmuls(
    shapes_model, estimator, beta, micro_batch, guidance, sketch_context
):
  cfg, layout = shapes_model
  rows, steps = 8, 4
  r = rl.preset(
      "htgrpo",
      group_size=4,
      num_sampler_steps=steps,
      n_global=1,
      n_struct=2,
      n_refine=1,
      estimator=estimator,
      beta=beta,
      micro_batch_size=micro_batch,
      estimator_guidance=guidance,
      sketch_context=sketch_context,
  )
  if sketch_context == "trajectory":
    assert rl.canvas_groups(r) == (0, 1, 2, 3)
  s = SamplerConfig(num_steps=steps, sketch_steps=r.sketch_steps, cfg_scale=2.0)
  fn = policy.make_canvas_logits_fn(cfg, layout)
  if guidance == "guided":
    fn = guided_canvas_logits_fn(fn, s, layout.unconditional_prompts(1)[0])
  optimizer = rl.make_optimizer(1e-3)
  params = policy.abstract_params(cfg, layout)
  state = jax.eval_shape(lambda p: rl.TrainState.create(p, optimizer, with_reference=beta > 0), params)
  step = rl.make_train_step(fn, optimizer, r)
  counted = traced_flops(step, state, _rollout(layout, rows, steps), jax.random.PRNGKey(0))
  guided_rows = 2 if guidance == "guided" else 1
  assert flops.train_step_flops(cfg, layout, r, rows, guided_rows) == pytest.approx(counted, rel=1e-12)


@pytest.mark.parametrize("program, cfg_scale", [("sampler", 2.0), ("sampler", 0.0), ("sketch", 2.0), ("paint", 2.0)])
def test_sampler_flops_equal_the_programs_matmuls(shapes_model, program, cfg_scale):
  cfg, layout = shapes_model
  rows = 4
  s = SamplerConfig(num_steps=5, sketch_steps=2, cfg_scale=cfg_scale)
  sampler = make_sampler(policy.make_canvas_logits_fn(cfg, layout), s, num_tokens=layout.num_image_tokens)
  params = policy.abstract_params(cfg, layout)
  prompts, _ = _inputs(layout, rows)
  uncond = jnp.asarray(layout.unconditional_prompts(rows), jnp.int32)
  key = jax.random.PRNGKey(0)
  if program == "paint":
    sketch = jax.eval_shape(sampler.sketch, params, prompts, uncond, key)
    counted = traced_flops(sampler.paint, params, sketch, key)
  else:
    entry = sampler.sample if program == "sampler" else sampler.sketch
    counted = traced_flops(entry, params, prompts, uncond, key)
  assert counted > 0
  assert flops.sampler_flops(cfg, layout, s, rows, program) == pytest.approx(counted, rel=1e-12)


def test_matmul_flops_scale_as_the_model_grows():
  """Per-token cost: linear in rows, quadratic in width, and attention quadratic in length."""
  cfg = llada.get_config("tiny")
  base = flops.matmul_flops(cfg, 1, 64, 16, 32)
  assert flops.matmul_flops(cfg, 3, 64, 16, 32) == pytest.approx(3 * base)
  deeper = dataclasses.replace(cfg, n_layers=2 * cfg.n_layers)
  head = flops.matmul_flops(cfg, 1, 64, 16, 32) - flops.matmul_flops(cfg, 1, 64, 0, 32)
  assert flops.matmul_flops(deeper, 1, 64, 16, 32) == pytest.approx(2 * base - head)
  with pytest.raises(ValueError, match="program="):
    flops.sampler_steps(SamplerConfig(num_steps=4, sketch_steps=2), "decode")
