"""VQ image decoders: parity with independent PyTorch decoders loaded from the same HF-layout
safetensors, full-size parameter counts, converter key/shape validation, mesh decode, DiMOO rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from htgrpo_jax import parallel
from htgrpo_jax.models.vq import convert, magvit2, vqgan
from tests.helpers.torch_vq_reference import MAG, VQG, TMagvit, TVQGAN, randomize, write_ckpt


@pytest.fixture(scope="module")
def magvit_pair(tmp_path_factory):
  model = randomize(TMagvit(MAG), seed=1)
  path = write_ckpt(tmp_path_factory.mktemp("magvit") / "model.safetensors", model)
  return model, path, convert.load_magvit2_params(path, MAG)


@pytest.fixture(scope="module")
def vqgan_pair(tmp_path_factory):
  model = randomize(TVQGAN(VQG), seed=2)
  d = tmp_path_factory.mktemp("vqvae")
  write_ckpt(d / convert.DIFFUSERS_SINGLE, model)  # diffusers file name inside a vqvae/ dir
  return model, str(d), convert.load_vqgan_params(str(d), VQG)


def _codes(b, h, w, k, seed=0):
  return np.random.default_rng(seed).integers(0, k, (b, h, w)).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# Parity.


def _float_parity(module, config, model, params, codes) -> tuple[np.ndarray, np.ndarray]:
  """(torch reference pixels, our uint8 pixels) of ``codes``, after checking our float pixels match
  the reference's on a non-square 3 x 5 grid (x4 upsampling)."""
  with torch.no_grad():
    ref = model(torch.as_tensor(codes, dtype=torch.long)).numpy()
  got, img = jax.jit(lambda p, c: (module.decode_float(p, c, config), module.decode(p, c, config)))(params, codes)
  got, img = np.asarray(got), np.asarray(img)
  assert got.shape == (2, 12, 20, 3) and ref.shape == got.shape
  diff = np.abs(got - ref).max()
  print(f"{module.__name__.rsplit('.', 1)[-1]} tiny parity max|diff| = {diff:.3g}")
  assert diff < 1e-4
  return ref, img


def test_magvit2_matches_torch(magvit_pair):
  model, _, params = magvit_pair
  ref, img = _float_parity(magvit2, MAG, model, params, _codes(2, 3, 5, MAG.codebook_size))
  assert 0.05 < ref.std()  # the random net is not saturated to a constant image
  assert img.dtype == np.uint8
  ref8 = (ref * 255).astype(np.uint8)  # the reference's truncating cast
  assert np.abs(img.astype(int) - ref8).max() <= 1 and (img == ref8).mean() > 0.99


def test_vqgan_matches_torch(vqgan_pair):
  model, _, params = vqgan_pair
  ref, img = _float_parity(vqgan, VQG, model, params, _codes(2, 3, 5, VQG.num_vq_embeddings, seed=1))
  assert 0.05 < ref.std() and 0.01 < (ref > 0).mean() and (ref < 1).mean() > 0.01
  ref8 = np.round(ref * 255).astype(np.uint8)  # diffusers' postprocess rounds
  assert np.abs(img.astype(int) - ref8).max() <= 1 and (img == ref8).mean() > 0.99


def test_lfq_bits_msb_first():
  e = np.asarray(magvit2.lfq_embed(jnp.array([0, 1, 4096, 8191, 5]), 13))
  assert (e[0] == -1).all() and (e[3] == 1).all()
  assert e[1, -1] == 1 and (e[1, :-1] == -1).all()  # code 1 sets the last bit
  assert e[2, 0] == 1 and (e[2, 1:] == -1).all()  # 4096 sets the first
  assert list(e[4, -3:]) == [1, -1, 1]


# ------------------------------------------------------------------------------------------------
# Full-size parameter counts: eval_shape vs the torch decoders built on the meta device.


@pytest.mark.parametrize(
    "mod,preset,tmod,approx",
    [
        (magvit2, "mmada", TMagvit, 40e6),
        (vqgan, "dimoo", TVQGAN, 88e6),
    ],
)
def test_full_size_param_counts(mod, preset, tmod, approx):
  cfg = mod.PRESETS[preset]
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(mod.abstract_params(cfg)))
  with torch.device("meta"):
    n_torch = sum(p.numel() for p in tmod(cfg).parameters())
  print(f"{preset}: {n} decoder params (torch {n_torch})")
  assert n == n_torch
  assert abs(n - approx) / approx < 0.01  # the reference gives "~40M" / "~88M"
  pmap = (convert.magvit2_param_map if mod is magvit2 else convert.vqgan_param_map)(cfg)
  assert sum(int(np.prod(s)) for _, s, _ in pmap.values()) == n


# ------------------------------------------------------------------------------------------------
# Converter validation: every failure names the tensor.


@pytest.mark.parametrize("kind", ["magvit", "vqgan"])
@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_converter_names_bad_tensor(tmp_path, kind, case):
  if kind == "magvit":
    model, load, cfg = TMagvit(MAG), convert.load_magvit2_params, MAG
    key = "decoder.up.1.block.0.nin_shortcut.weight"
  else:
    model, load, cfg = TVQGAN(VQG), convert.load_vqgan_params, VQG
    key = "decoder.up_blocks.2.resnets.0.conv_shortcut.weight"
  assert key in model.state_dict()
  bad = {
      "missing": dict(drop=[key]),
      "extra": dict(add=["decoder.up.9.block.0.conv1.bias"]),
      "shape": dict(reshape=(key, (2, 2, 1, 1))),
  }[case]
  name = bad["add"][0] if case == "extra" else key
  path = write_ckpt(tmp_path / "model.safetensors", model, **bad)
  with pytest.raises(ValueError, match=name.replace(".", r"\.")):
    load(path, cfg)


def test_converter_checks_lfq_buffer_and_config(tmp_path):
  model = TMagvit(MAG)
  with torch.no_grad():
    model.quantize.embedding.copy_(model.quantize.embedding.flip(-1))  # LSB-first bit order
  with pytest.raises(ValueError, match=r"quantize\.embedding"):
    convert.load_magvit2_params(write_ckpt(tmp_path / "m.safetensors", model), MAG)
  with pytest.raises(ValueError, match="is missing"):  # the tiny net is not the full preset
    convert.load_magvit2_params(str(tmp_path / "m.safetensors"))
  d = tmp_path / "vqvae"
  d.mkdir()
  write_ckpt(d / convert.DIFFUSERS_SINGLE, TVQGAN(VQG))
  (d / "config.json").write_text('{"layers_per_block": 2, "norm_type": "group"}')
  with pytest.raises(ValueError, match="layers_per_block"):
    convert.load_vqgan_params(str(d), VQG)


# ------------------------------------------------------------------------------------------------
# Sharded decode (as inside the rollout) and DiMOO's newline rows.


@pytest.mark.parametrize("mod,cfg,pair", [(magvit2, MAG, "magvit_pair"), (vqgan, VQG, "vqgan_pair")])
def test_decode_on_mesh_matches_single_device(request, mod, cfg, pair):
  _, path, params = request.getfixturevalue(pair)
  mesh = parallel.make_mesh(data=4, fsdp=2, tensor=1)
  load = convert.load_magvit2_params if mod is magvit2 else convert.load_vqgan_params
  rep = load(path, cfg, mesh=mesh)
  codes = _codes(8, 2, 3, 64, seed=3)
  out = mod.make_decode(cfg, mesh)(rep, parallel.shard_batch(codes, mesh))
  assert out.dtype == jnp.uint8 and out.shape == (8, 8, 12, 3)
  assert out.sharding.spec[0] == parallel.BATCH_AXES
  assert len(out.addressable_shards) == 8 and out.addressable_shards[0].data.shape[0] == 1
  # Per-device batches of 1 may pick other conv algorithms than batch 8: a pixel on a rounding
  # boundary can move by one level.
  diff = np.abs(np.asarray(out).astype(int) - np.asarray(mod.make_decode(cfg)(params, codes)))
  assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_strip_newlines():
  h, w = 3, 4
  codes = _codes(2, h, w, VQG.num_vq_embeddings, seed=4)
  rows = np.concatenate([codes + VQG.code_offset, np.full((2, h, 1), VQG.newline_id)], axis=-1)
  tokens = rows.reshape(2, h * (w + 1))
  np.testing.assert_array_equal(np.asarray(vqgan.strip_newlines(tokens, h, w, VQG)), codes)
  jitted = jax.jit(vqgan.strip_newlines, static_argnums=(1, 2, 3))
  np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(tokens), h, w, VQG)), codes)
  bad = tokens.copy()
  bad[1, 2 * (w + 1) - 1] = 126336  # a mask where row 1's newline should be
  with pytest.raises(ValueError, match="row 1 of batch 1"):
    vqgan.strip_newlines(bad, h, w, VQG)
  bad = tokens.copy()
  bad[0, 1] = 126336  # a still-masked image slot
  with pytest.raises(ValueError, match="126336"):
    vqgan.strip_newlines(bad, h, w, VQG)
  with pytest.raises(ValueError, match="h\\*\\(w\\+1\\)"):
    vqgan.strip_newlines(tokens[:, :-1], h, w, VQG)


def test_build_decoder_reads_dimoo_canvas_rows(vqgan_pair, word_tokenizer_dir):
  """The trainer's decoder: a DiMOO sequence (rows ending in newlines) -> the layout's canvas ->
  pixels, equal to stripping the newlines by hand and decoding the [B, h, w] grid."""
  from htgrpo_jax.models import vq
  from htgrpo_jax.models.layouts import DiMOOLayout

  _, path, params = vqgan_pair
  layout = DiMOOLayout(
      word_tokenizer_dir,
      height=32,
      width=48,
      prompt_length=40,
      codebook_size=VQG.num_vq_embeddings,
      image_offset=VQG.code_offset,
  )
  h, w = layout.grid
  codes = _codes(2, h, w, VQG.num_vq_embeddings, seed=5)
  seq = np.asarray(layout.assemble(jnp.asarray(layout.unconditional_prompts(2)), jnp.asarray(codes.reshape(2, h * w))))
  start = layout.image_positions[0]
  by_hand = vqgan.strip_newlines(seq[:, start : start + h * (w + 1)], h, w, VQG)
  decode, loaded = vq.build_decoder("vqgan", path, layout.grid, config=VQG)
  got = jax.jit(decode)(loaded, layout.codes_from_tokens(jnp.asarray(seq)))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(vqgan.decode(params, by_hand, VQG)))
  assert got.shape == (2, VQG.scale * h, VQG.scale * w, 3)


def test_build_decoder_names_the_config_key(tmp_path, magvit_pair):
  from htgrpo_jax.models import vq

  with pytest.raises(ValueError, match=r"model\.vq_checkpoint: .* does not exist"):
    vq.build_decoder("magvit2", str(tmp_path / "nope"), (2, 2), key="model.vq_checkpoint")
  with pytest.raises(ValueError, match="model.vq_kind='vqvae'"):
    vq.build_decoder("vqvae", magvit_pair[1], (2, 2))
  # A MAGVIT-v2 file read as the full-size preset: the converter's shape error, prefixed by the key.
  with pytest.raises(ValueError, match=r"^model\.vq_checkpoint="):
    vq.build_decoder("magvit2", magvit_pair[1], (2, 2), key="model.vq_checkpoint")
