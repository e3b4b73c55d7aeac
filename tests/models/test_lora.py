"""LoRA on the LLaDA backbone: a fresh adapter is the base to the bit, adapters-off is the base,
dropout only in gradient passes, the merge, the update trains the adapters alone and its KL to the
adapter-off base is the KL to an explicit reference copy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from htgrpo_jax import parallel, rl
from htgrpo_jax.contracts import Adapted, TrainState
from htgrpo_jax.models import layouts, llada, lora, policy
from tests.helpers.rl_toy import random_rollout

LORA = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0)


@pytest.fixture(scope="module")
def layout(word_tokenizer_dir):
  return layouts.EmbeddedLayout(word_tokenizer_dir, grid=(2, 4), codebook_size=16, prompt_length=5)


def _cfg(layout, scan=True, **lora_kw):
  vocab = -(-layout.vocab_size // 8) * 8
  return llada.get_config(
      "shapes",
      vocab_size=vocab,
      d_model=32,
      n_heads=4,
      mlp_hidden=64,
      n_layers=2,
      use_pad_mask=True,
      pad_id=layout.pad_id,
      learned_pos_emb=16,
      scan_layers=scan,
      init_std=0.2,
      lora=dataclasses.replace(LORA, **lora_kw),
  )


def _inputs(layout):
  prompts = jnp.asarray(layout.encode_prompts(["a red circle", "two blue square"]))
  canvas = jnp.asarray([[-1] * 8, [1, 2, 3, -1, 5, 6, 7, 0]], jnp.int32)
  return prompts, canvas


def _nudged(adapters, seed=1, scale=0.3):
  """Adapters with B moved off zero (as after training)."""
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_fresh_adapters_and_adapters_off_give_the_base_logits_to_the_bit(layout, scan):
  cfg = _cfg(layout, scan)
  base = policy.init_params(cfg, layout, jax.random.key(0))
  # The LoRA setting does not change the base init (adapters draw from their own rng stream).
  plain = policy.init_params(dataclasses.replace(cfg, lora=None), layout, jax.random.key(0))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(plain)))
  adapters = policy.init_adapters(cfg, layout, jax.random.key(1))
  fn = jax.jit(policy.make_canvas_logits_fn(cfg, layout))
  prompts, canvas = _inputs(layout)
  ref = np.asarray(fn(base, prompts, canvas))
  assert np.abs(ref).max() > 0.1
  fresh = np.asarray(fn(Adapted(base, adapters), prompts, canvas))
  off = np.asarray(fn(Adapted(base, None, jax.random.key(2)), prompts, canvas))
  np.testing.assert_array_equal(fresh, ref)  # B = 0: the adapter adds exact zeros
  np.testing.assert_array_equal(off, ref)
  # A is random, B zero (PEFT's init); a trained adapter does change the logits.
  assert all(np.abs(a).max() > 0 for k, a in _items(adapters) if k.endswith("_a"))
  assert all(np.abs(b).max() == 0 for k, b in _items(adapters) if k.endswith("_b"))
  assert np.abs(np.asarray(fn(Adapted(base, _nudged(adapters)), prompts, canvas)) - ref).max() > 1e-3


def _items(tree):
  return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_adapters_sit_on_the_targeted_projections_and_shard_like_their_kernels(layout):
  cfg = _cfg(layout, targets="q_proj|up_proj")
  shapes = policy.abstract_adapters(cfg, layout)
  assert {k: v.shape for k, v in shapes["blocks"].items()} == {
      "q_proj_a": (2, 32, 4),
      "q_proj_b": (2, 4, 4, 8),
      "up_proj_a": (2, 32, 4),
      "up_proj_b": (2, 4, 64),
  }
  mesh = parallel.make_mesh(data=1, fsdp=2, tensor=4)
  sh = policy.adapter_shardings(cfg, layout, mesh)["blocks"]
  # A's input dim like the kernel's (embed -> fsdp), B's output dims like the kernel's (-> tensor)
  # and its rank over fsdp: no chip holds an adapter whole.
  assert tuple(sh["q_proj_a"].spec) == (None, "fsdp", None)
  assert tuple(sh["q_proj_b"].spec) == (None, "fsdp", "tensor", None)
  assert tuple(sh["up_proj_b"].spec) == (None, "fsdp", "tensor")
  with pytest.raises(ValueError, match=r"adapter .*q_proj_b.* dim 4 does not divide"):
    policy.adapter_shardings(cfg, layout, parallel.make_mesh(data=1, fsdp=8, tensor=1))
  placed = policy.init_adapters(cfg, layout, jax.random.key(0), mesh)
  assert placed["blocks"]["q_proj_a"].sharding == sh["q_proj_a"]
  n_base = llada.count_params(policy.abstract_params(cfg, layout))
  print(f"adapters {llada.count_params(shapes)} scalars vs base {n_base}")


def test_dropout_only_where_an_rng_is_given(layout):
  cfg = _cfg(layout, dropout=0.5)
  base = policy.init_params(cfg, layout, jax.random.key(0))
  ad = _nudged(policy.init_adapters(cfg, layout, jax.random.key(1)))
  fn = jax.jit(policy.make_canvas_logits_fn(cfg, layout))
  no_drop = jax.jit(policy.make_canvas_logits_fn(dataclasses.replace(cfg, lora=LORA), layout))
  prompts, canvas = _inputs(layout)
  det = np.asarray(fn(Adapted(base, ad), prompts, canvas))
  np.testing.assert_array_equal(det, np.asarray(no_drop(Adapted(base, ad), prompts, canvas)))
  k1, k2 = jax.random.split(jax.random.key(3))
  d1 = np.asarray(fn(Adapted(base, ad, k1), prompts, canvas))
  d2 = np.asarray(fn(Adapted(base, ad, k2), prompts, canvas))
  assert np.abs(d1 - det).max() > 1e-3 and np.abs(d1 - d2).max() > 1e-3
  np.testing.assert_array_equal(d1, np.asarray(fn(Adapted(base, ad, k1), prompts, canvas)))


@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_merged_weights_give_the_adapted_logits(layout, scan):
  cfg = _cfg(layout, scan)
  base = policy.init_params(cfg, layout, jax.random.key(0))
  ad = _nudged(policy.init_adapters(cfg, layout, jax.random.key(1)))
  fn = jax.jit(policy.make_canvas_logits_fn(cfg, layout))
  prompts, canvas = _inputs(layout)
  merged = lora.merge(cfg.lora, base, ad)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  want = np.asarray(fn(Adapted(base, ad), prompts, canvas))
  np.testing.assert_allclose(np.asarray(fn(merged, prompts, canvas)), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(rank=-1), "model.lora.rank"),
        (dict(rank=2.5), "model.lora.rank"),
        (dict(rank=4, alpha=0.0), "model.lora.alpha"),
        (dict(rank=4, dropout=1.0), "model.lora.dropout"),
        (dict(rank=4, targets="q_proj("), "model.lora.targets"),
        (dict(rank=4, targets="wte"), "matches none"),
        (dict(rank=4, ranks=2), "model.lora.ranks"),
    ],
)
def test_bad_lora_settings_are_named(over, match):
  with pytest.raises(ValueError, match=match):
    lora.from_config({"lora": dict(dict(alpha=8.0, dropout=0.0, targets="q_proj"), **over)})


def test_rank_zero_or_none_is_off():
  assert lora.from_config({"lora": dict(rank=0, alpha=8.0)}) is None
  assert lora.from_config({"lora": dict(rank=None, alpha=8.0)}) is None
  assert lora.from_config({}) is None


# ------------------------------------------------------------------------------------------------
# The update.

RL = rl.HTGRPOConfig(
    group_size=4, num_sampler_steps=4, n_global=1, n_struct=1, n_refine=1, beta=0.5, estimator="htgrpo"
)


def _rollouts(layout, steps=2):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(steps):
    r = random_rollout(rng, 8, layout.num_image_tokens, layout.codebook_size, 4, lp=5)
    # Prompt tokens must be ids the layout accepts: real prompts, repeated over each group.
    prompts = np.repeat(layout.encode_prompts(["a red circle", "two blue square"]), 4, axis=0)
    out.append(r.replace(prompt_tokens=jnp.asarray(prompts)))
  return out


def _run(step_fn, state, rollouts):
  metrics = []
  for i, ro in enumerate(rollouts):
    state, m = step_fn(state, ro, jax.random.fold_in(jax.random.key(7), i))
    metrics.append(jax.device_get(m))
  return state, metrics


def test_update_trains_the_adapters_alone_with_the_base_as_reference(layout):
  cfg = _cfg(layout)
  base = policy.init_params(cfg, layout, jax.random.key(0))
  adapters = policy.init_adapters(cfg, layout, jax.random.key(1))
  opt = optax.adam(3e-2)
  canvas_fn = policy.make_canvas_logits_fn(cfg, layout)
  rollouts = _rollouts(layout)

  base_copy = jax.tree.map(jnp.copy, base)
  state = TrainState.create(adapters, opt, frozen=base)
  assert state.ref_params is None
  lora_state, lora_m = _run(rl.make_train_step(canvas_fn, opt, RL, donate=False), state, rollouts)

  # The frozen base is untouched; only the adapters (and their moments) moved.
  for a, b in zip(jax.tree.leaves(lora_state.frozen), jax.tree.leaves(base_copy)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(lora_state.params) == jax.tree.structure(adapters)
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(lora_state.params), jax.tree.leaves(adapters))]
  assert min(moved) > 0
  mu = lora_state.opt_state[0].mu
  assert jax.tree.structure(mu) == jax.tree.structure(adapters)
  n_opt = llada.count_params(lora_state.opt_state)
  n_ad, n_base = llada.count_params(adapters), llada.count_params(base)
  print(
      f"adapters {n_ad}, optimizer state {n_opt}, frozen base {n_base} scalars (not in the state's " f"trainable part)"
  )
  assert n_opt == 2 * n_ad + 1  # Adam's two moments of the adapters and its count

  # The same update with an explicit reference copy of the base (the full fine-tuning layout of
  # the state: a ref_params pytree) gives the same KL and the same adapters.
  explicit_fn = lambda prm, p, c: canvas_fn(prm if "wte" in prm else Adapted(base_copy, prm), p, c)
  state2 = TrainState.create(adapters, opt, ref_params=jax.tree.map(jnp.copy, base_copy))
  ex_state, ex_m = _run(rl.make_train_step(explicit_fn, opt, RL, donate=False), state2, rollouts)
  assert lora_m[1]["total"]["kl"] > 1e-6  # the policy moved away from the base by step 2
  for m1, m2 in zip(lora_m, ex_m):
    np.testing.assert_allclose(m1["total"]["kl"], m2["total"]["kl"], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(m1["total"]["loss"], m2["total"]["loss"], rtol=1e-5, atol=1e-9)
  for a, b in zip(jax.tree.leaves(lora_state.params), jax.tree.leaves(ex_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_dropout_reaches_the_gradient_pass_only(layout):
  """Rollout, old-policy and reference passes see no dropout: the old log-probs (behaviour gap) and
  the KL reference agree with a dropout-free run, while the gradient pass differs."""
  base_cfg = _cfg(layout)
  base = policy.init_params(base_cfg, layout, jax.random.key(0))
  adapters = _nudged(policy.init_adapters(base_cfg, layout, jax.random.key(1)))
  opt = optax.adam(1e-2)
  rollouts = _rollouts(layout, steps=1)
  out = {}
  for rate in (0.0, 0.5):
    cfg = _cfg(layout, dropout=rate)
    step = rl.make_train_step(policy.make_canvas_logits_fn(cfg, layout), opt, RL, donate=False)
    out[rate] = _run(step, TrainState.create(adapters, opt, frozen=base), rollouts)
  (s0, m0), (s5, m5) = out[0.0], out[0.5]
  np.testing.assert_array_equal(m0[0]["behaviour_gap"], m5[0]["behaviour_gap"])
  assert abs(float(m0[0]["behaviour_gap"])) > 0
  diff = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s5.params)))
  assert diff > 1e-6
