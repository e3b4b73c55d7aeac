"""LLaDA backbone + policy glue: contract, invariances, 8B shapes without allocation, sharding."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding

from htgrpo_jax import parallel
from htgrpo_jax.models import layouts, llada, policy
from htgrpo_jax.rl.rollout import MASK

TINY = llada.get_config("tiny", vocab_size=64, d_model=32, n_heads=4, mlp_hidden=48, init_std=0.2)


def _apply(cfg, params, tokens, select=None, head_rows=None):
  # One jitted program per call site compiles faster than op-by-op dispatch of the whole model.
  sel = None if select is None else tuple(int(i) for i in select)
  return _jitted(cfg, sel, head_rows)(params, tokens)


@functools.lru_cache(maxsize=None)
def _jitted(cfg, select, head_rows):
  sel = None if select is None else np.asarray(select)
  return jax.jit(lambda p, t: llada.LLaDA(cfg).apply({"params": p}, t, select=sel, head_rows=head_rows))


def _init(cfg, key=0, length=4):
  return nn.meta.unbox(llada.LLaDA(cfg).init(jax.random.key(key), jnp.zeros((1, length), jnp.int32))["params"])


def _stack(params, n):
  """Unrolled params (block_i) -> scanned params (blocks with a leading layer axis)."""
  out = {k: v for k, v in params.items() if not k.startswith("block_")}
  out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"block_{i}"] for i in range(n)])
  return out


def test_scan_and_remat_match_unrolled():
  """Scanned + rematerialised blocks give the unrolled model's loss and gradients."""
  params = _init(TINY)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)
  scan_full = dataclasses.replace(TINY, scan_layers=True, remat="full")
  # A loss that touches every logit non-linearly, so any wrong logit shows in value or gradient.
  loss = lambda cfg: jax.jit(
      jax.value_and_grad(lambda p: jnp.sum(jnp.sin(llada.LLaDA(cfg).apply({"params": p}, tokens))))
  )
  v_ref, g_ref = loss(TINY)(params)
  v_scan, g_scan = loss(scan_full)(_stack(params, TINY.n_layers))
  np.testing.assert_allclose(v_scan, v_ref, rtol=1e-5)
  assert g_scan["blocks"]["q_proj"].shape == (2, 32, 4, 8)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), _stack(g_ref, TINY.n_layers), g_scan
  )


def test_head_rows_and_select_equal_sliced_full_logits():
  params = _init(TINY)
  tokens = jax.random.randint(jax.random.key(2), (2, 11), 0, 64)
  full = _apply(TINY, params, tokens)
  for select in (np.arange(3, 9), np.array([0, 4, 10, 2])):
    part = _apply(TINY, params, tokens, select=select, head_rows=(40, 16))
    np.testing.assert_allclose(part, full[:, select, 40:56], atol=1e-5)
  with pytest.raises(ValueError, match="head_rows"):
    _apply(TINY, params, tokens, head_rows=(60, 16))


def test_bidirectional_and_no_position_leak():
  """Changing the last token changes the first position's logits (no causal mask)."""
  params = _init(TINY)
  tokens = jax.random.randint(jax.random.key(3), (1, 8), 0, 64)
  a = _apply(TINY, params, tokens)
  b = _apply(TINY, params, tokens.at[0, -1].set((tokens[0, -1] + 1) % 64))
  assert float(jnp.max(jnp.abs(a[0, 0] - b[0, 0]))) > 1e-4


def test_left_padding_with_pad_mask_equals_unpadded():
  """RoPE attends by relative position, so masked left pads leave the real outputs unchanged.

  This is what makes the DiMOO layout's fixed-length prompts exact."""
  cfg = dataclasses.replace(TINY, use_pad_mask=True, pad_id=0)
  params = _init(cfg)
  real = jax.random.randint(jax.random.key(4), (1, 7), 1, 64)
  unpadded = _apply(cfg, params, real)
  padded = _apply(cfg, params, jnp.concatenate([jnp.zeros((1, 5), jnp.int32), real], axis=1))
  np.testing.assert_allclose(padded[:, 5:], unpadded, atol=1e-5)
  nomask = _apply(dataclasses.replace(TINY), params, jnp.concatenate([jnp.zeros((1, 5), jnp.int32), real], axis=1))
  assert float(jnp.max(jnp.abs(nomask[:, 5:] - unpadded))) > 1e-4  # the mask matters
  assert bool(jnp.all(jnp.isfinite(padded)))


def test_bf16_compute_close_to_fp32():
  params = _init(TINY)
  tokens = jax.random.randint(jax.random.key(5), (2, 8), 0, 64)
  ref = _apply(TINY, params, tokens)
  out = _apply(dataclasses.replace(TINY, dtype=jnp.bfloat16), params, tokens)
  assert out.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(out - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_learned_pos_emb_breaks_shift_invariance_and_checks_length():
  cfg = dataclasses.replace(TINY, learned_pos_emb=8)
  params = _init(cfg)
  assert params["wpe"].shape == (8, 32)
  with pytest.raises(ValueError, match="learned_pos_emb"):
    _apply(cfg, params, jnp.zeros((1, 9), jnp.int32))


@pytest.mark.parametrize("name,vocab", [("mmada_8b", 134656), ("lumina_dimoo_8b", 134548)])
def test_8b_presets_eval_shape(name, vocab):
  cfg = llada.get_config(name)
  shapes = jax.eval_shape(lambda: _init(cfg))
  n = llada.count_params(shapes)
  assert n == cfg.num_params()
  # Reference: ~8.08B (6.98B blocks + 2 x 0.55B embedding/head).
  assert abs(n - 8.08e9) / 8.08e9 < 0.005, n
  assert shapes["wte"].shape == (vocab, 4096) and shapes["lm_head"].shape == (4096, vocab)
  assert shapes["blocks"]["ff_proj"].shape == (32, 4096, 12288)
  assert shapes["wte"].dtype == jnp.float32 and cfg.dtype == jnp.bfloat16


def test_config_errors():
  with pytest.raises(ValueError, match="preset"):
    llada.get_config("nope")
  with pytest.raises(ValueError, match="d_modle"):
    llada.get_config("tiny", d_modle=3)
  with pytest.raises(ValueError, match="remat"):
    llada.get_config("tiny", remat="some")
  with pytest.raises(ValueError, match="pad_id"):
    llada.get_config("tiny", use_pad_mask=True)


@pytest.fixture(scope="module")
def embedded(word_tokenizer_dir):
  lay = layouts.EmbeddedLayout(word_tokenizer_dir, grid=(2, 4), codebook_size=16, prompt_length=5)
  vocab = -(-lay.vocab_size // 8) * 8  # tensor/fsdp axes must divide the vocab dimension
  cfg = llada.get_config(
      "shapes",
      vocab_size=vocab,
      d_model=32,
      n_heads=4,
      mlp_hidden=64,
      n_layers=2,
      use_pad_mask=True,
      pad_id=lay.pad_id,
      learned_pos_emb=16,
      scan_layers=True,
      init_std=0.2,
  )
  return lay, cfg


def test_logits_fn_contract(embedded):
  lay, cfg = embedded
  params = policy.init_params(cfg, lay, jax.random.key(0))
  prompts = jnp.asarray(lay.encode_prompts(["a red circle", "two blue square"]))
  canvas = jnp.asarray([[MASK] * 8, [1, 2, 3, MASK, 5, 6, 7, 0]], jnp.int32)
  tokens = lay.assemble(prompts, canvas)
  logits = jax.jit(policy.make_logits_fn(cfg, lay))(params, tokens)
  assert logits.shape == (2, 8, 16) and logits.dtype == jnp.float32
  full = _apply(cfg, params, tokens)
  np.testing.assert_allclose(logits, full[:, 5:13, lay.image_offset : lay.image_offset + 16], atol=1e-5)
  via_canvas = policy.make_canvas_logits_fn(cfg, lay)(params, prompts, canvas)
  np.testing.assert_allclose(via_canvas, logits, atol=1e-6)
  with pytest.raises(ValueError, match="tokens shape"):
    policy.make_logits_fn(cfg, lay)(params, tokens[:, 1:])
  with pytest.raises(ValueError, match="vocab_size"):
    policy.make_logits_fn(dataclasses.replace(cfg, vocab_size=lay.vocab_size - 1), lay)
  with pytest.raises(ValueError, match="pad_id"):
    policy.make_logits_fn(dataclasses.replace(cfg, pad_id=lay.pad_id + 1), lay)
  with pytest.raises(ValueError, match="use_pad_mask"):
    policy.make_logits_fn(dataclasses.replace(cfg, use_pad_mask=False), lay)


def _loss_fn(cfg, lay):
  fn = policy.make_canvas_logits_fn(cfg, lay)
  return lambda p, pr, c: jnp.sum(jax.nn.log_softmax(fn(p, pr, c))[..., 0])


@pytest.fixture(scope="module")
def single_device_reference(embedded):
  """Params, inputs and (loss, grad) computed on one device, shared by the mesh variants."""
  lay, cfg = embedded
  local = policy.init_params(cfg, lay, jax.random.key(3))
  prompts = jnp.asarray(lay.encode_prompts(["a red circle"] * 4))
  canvas = jnp.full((4, 8), MASK, jnp.int32).at[:, 3].set(5)
  return local, prompts, canvas, jax.jit(jax.value_and_grad(_loss_fn(cfg, lay)))(local, prompts, canvas)


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_sharded_init_and_forward_match_single_device(embedded, single_device_reference, axis_type):
  lay, cfg = embedded
  local, prompts, canvas, (ref_val, ref_grad) = single_device_reference
  if axis_type == "explicit":
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)  # the package's mesh (Explicit axes)
  else:  # MaxText-style Auto axes: Linen logical constraints are GSPMD annotations
    mesh = jax.make_mesh((2, 2, 2), parallel.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with pytest.raises(ValueError, match="lm_head"):
    policy.param_shardings(dataclasses.replace(cfg, vocab_size=cfg.vocab_size + 1), lay, mesh)
  key = jax.random.key(3)
  params = policy.init_params(cfg, lay, key, mesh=mesh)
  q = params["blocks"]["q_proj"]
  assert isinstance(q.sharding, NamedSharding)
  assert tuple(q.sharding.spec) == (None, "fsdp", "tensor", None)
  assert tuple(params["lm_head"].sharding.spec) == ("fsdp", "tensor")
  abstract = policy.abstract_params(cfg, lay, mesh)
  assert abstract["lm_head"].sharding == params["lm_head"].sharding
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b), params, local)
  shard = parallel.batch_sharding(mesh, 2)
  step = jax.jit(
      jax.value_and_grad(_loss_fn(cfg, lay)), in_shardings=(policy.param_shardings(cfg, lay, mesh), shard, shard)
  )
  with jax.set_mesh(mesh):
    val, grad = step(params, prompts, canvas)
  np.testing.assert_allclose(val, ref_val, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grad, ref_grad)
