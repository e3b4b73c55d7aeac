"""HF LLaDA checkpoint conversion: parity with an independent PyTorch (transformers Llama) forward,
key/shape validation, sharded placement and the Orbax round trip."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from htgrpo_jax import parallel
from htgrpo_jax.models import convert, llada, safetensors_io
from tests.helpers.llada_checkpoint import CFG, write_llada_checkpoint

PAD = 0


def torch_llama_logits(sd, cfg, tokens, pad_mask):
  """Logits of transformers' Llama with LLaDA's weights and a bidirectional (pairwise pad) mask."""
  from transformers import LlamaConfig, LlamaForCausalLM

  hf = LlamaConfig(
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model,
      intermediate_size=cfg.mlp_hidden,
      num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_heads,
      rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta,
      max_position_embeddings=256,
      tie_word_embeddings=False,
      mlp_bias=False,
      attention_bias=False,
      attn_implementation="eager",
  )
  model = LlamaForCausalLM(hf).eval()
  names = {
      "attn_norm": "input_layernorm",
      "ff_norm": "post_attention_layernorm",
      "q_proj": "self_attn.q_proj",
      "k_proj": "self_attn.k_proj",
      "v_proj": "self_attn.v_proj",
      "attn_out": "self_attn.o_proj",
      "ff_proj": "mlp.gate_proj",
      "up_proj": "mlp.up_proj",
      "ff_out": "mlp.down_proj",
  }
  mapped = {
      "model.embed_tokens.weight": sd["model.transformer.wte.weight"],
      "model.norm.weight": sd["model.transformer.ln_f.weight"],
      "lm_head.weight": sd["model.transformer.ff_out.weight"],
  }
  for k, t in sd.items():
    if ".blocks." in k:
      i, name = k.split(".blocks.")[1].split(".")[:2]
      mapped[f"model.layers.{i}.{names[name]}.weight"] = t
  missing, unexpected = model.load_state_dict({k: t.float() for k, t in mapped.items()}, strict=False)
  assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
  t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
  keep = torch.as_tensor(np.asarray(pad_mask))
  pair = keep[:, None, :, None] & keep[:, None, None, :]  # LLaDA's attention_bias, no causal part
  bias = torch.zeros(pair.shape).masked_fill(~pair, torch.finfo(torch.float32).min)
  with torch.no_grad():
    return model(input_ids=t, attention_mask=bias).logits.numpy()


@pytest.mark.parametrize("family", ["mmada_padded", "dimoo_unpadded"])
@pytest.mark.parametrize("scan", [True, False])
def test_parity_with_torch_llama(tmp_path, family, scan):
  sd = write_llada_checkpoint(tmp_path / "hf", CFG)
  rng = np.random.default_rng(1)
  tokens = rng.integers(1, CFG.vocab_size, (2, 12)).astype(np.int32)
  if family == "mmada_padded":
    cfg = dataclasses.replace(CFG, use_pad_mask=True, pad_id=PAD, scan_layers=scan)
    tokens[0, :4] = PAD  # left padding, as MMaDA's t2i prompt
    tokens[1, :1] = PAD
  else:
    cfg = dataclasses.replace(CFG, scan_layers=scan)
  keep = tokens != PAD if cfg.use_pad_mask else np.ones_like(tokens, bool)
  params = convert.load_llada_params(str(tmp_path / "hf"), cfg)
  ours = np.asarray(llada.LLaDA(cfg).apply({"params": params}, jnp.asarray(tokens)))
  ref = torch_llama_logits(sd, cfg, tokens, keep)
  err = np.max(np.abs(ours - ref)[keep])
  assert err < 1e-4, err
  assert np.max(np.abs(ref)) > 0.1  # the comparison is not between near-zero numbers


def test_bf16_checkpoint_sharded_and_orbax_round_trip(tmp_path):
  write_llada_checkpoint(tmp_path / "hf", CFG, dtype=torch.bfloat16)
  cfg = dataclasses.replace(CFG, scan_layers=True)
  mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
  params = convert.convert_checkpoint(str(tmp_path / "hf"), str(tmp_path / "out"), cfg, mesh=mesh)
  q = params["blocks"]["q_proj"]
  assert q.shape == (2, 32, 4, 8) and q.dtype == jnp.float32
  assert tuple(q.sharding.spec) == (None, "fsdp", "tensor", None)
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 8, 2, 8)
  ref = convert.load_llada_params(str(tmp_path / "hf"), cfg)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, ref)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
  restored = convert.restore_params(str(tmp_path / "out"), abstract)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), restored, params)


@pytest.mark.parametrize(
    "kind,match",
    [
        ("missing", "missing tensor.*blocks.1.up_proj.weight"),
        ("extra", "unexpected tensor.*blocks.0.q_proj.bias"),
        ("shape", r"blocks.0.ff_out.weight has shape \(32, 40\)"),
    ],
)
def test_bad_checkpoint_names_the_tensor(tmp_path, kind, match):
  kw = {
      "missing": dict(drop=["model.transformer.blocks.1.up_proj.weight"]),
      "extra": dict(add=["model.transformer.blocks.0.q_proj.bias"]),
      "shape": dict(reshape=("model.transformer.blocks.0.ff_out.weight", (32, 40))),
  }[kind]
  write_llada_checkpoint(tmp_path / "hf", CFG, **kw)
  with pytest.raises(ValueError, match=match):
    convert.load_llada_params(str(tmp_path / "hf"), CFG)


def test_config_json_mismatch_and_missing_index(tmp_path):
  write_llada_checkpoint(tmp_path / "hf", CFG)
  with open(tmp_path / "hf" / "config.json", "w") as f:
    json.dump({"d_model": CFG.d_model, "n_layers": 3, "activation_type": "silu"}, f)
  with pytest.raises(ValueError, match="n_layers"):
    convert.load_llada_params(str(tmp_path / "hf"), CFG)
  with pytest.raises(ValueError, match="model.safetensors.index.json"):
    convert.load_llada_params(str(tmp_path), CFG)


def test_cli_writes_checkpoint(tmp_path):
  write_llada_checkpoint(tmp_path / "hf", CFG)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
  cmd = [
      sys.executable,
      os.path.join(root, "launch", "convert_checkpoint.py"),
      f"--hf_dir={tmp_path / 'hf'}",
      f"--out_dir={tmp_path / 'out'}",
      "--preset=tiny",
      "--override=vocab_size=96",
      "--override=d_model=32",
      "--override=mlp_hidden=48",
      "--override=scan_layers=true",
      "--tensor=2",
  ]
  res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  cfg = dataclasses.replace(CFG, scan_layers=True)
  ref = convert.load_llada_params(str(tmp_path / "hf"), cfg)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), ref)
  restored = convert.restore_params(str(tmp_path / "out"), abstract)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), restored, ref)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.bfloat16,
        torch.float16,
        torch.float32,
        torch.float64,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    ],
)
def test_safetensors_reader_matches_safetensors_bit_for_bit(tmp_path, dtype):
  """The torch-free reader gives every tensor's exact bits, as safetensors' torch reader does."""
  from safetensors import safe_open

  g = torch.Generator().manual_seed(3)
  sd = {
      "a": torch.randn(5, 7, generator=g) * 300,
      "b": torch.randn(3, generator=g),
      "scalar": torch.tensor(2.5),
      "empty": torch.zeros(0, 4),
      "c": torch.randn(2, 3, 4, generator=g),
  }
  sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
  path = str(tmp_path / "t.safetensors")
  save_file(sd, path, metadata={"format": "pt"})
  with safetensors_io.open_safetensors(path) as f, safe_open(path, "pt") as ref:
    assert sorted(f.keys()) == sorted(ref.keys()) and f.metadata == {"format": "pt"}
    for k in ref.keys():
      want, got = ref.get_tensor(k), f.get_tensor(k)
      assert got.shape == tuple(want.shape) and f.shape(k) == tuple(want.shape), k
      assert got.dtype.itemsize == want.element_size(), k
      want_bits = want.reshape(-1).view(torch.uint8).numpy() if want.numel() else np.zeros(0, np.uint8)
      np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), want_bits, err_msg=k)
  if dtype == torch.bfloat16:  # and the values, through ml_dtypes
    with safetensors_io.open_safetensors(path) as f:
      np.testing.assert_array_equal(f.get_tensor("a").astype(np.float32), sd["a"].float().numpy())


@pytest.mark.parametrize(
    "damage,match",
    [
        ("truncate", "truncated"),
        ("header_len", "header length"),
        ("json", "not JSON"),
        ("dtype", "bad header entry"),
        ("size", "bytes for shape"),
        ("tiny", "shorter than"),
    ],
)
def test_safetensors_reader_names_a_damaged_file(tmp_path, damage, match):
  path = tmp_path / "t.safetensors"
  save_file({"w": torch.ones(4, 4), "v": torch.ones(8)}, str(path))
  raw = bytearray(path.read_bytes())
  n = int.from_bytes(raw[:8], "little")
  header = json.loads(raw[8 : 8 + n])
  if damage == "truncate":
    raw = raw[:-10]
  elif damage == "header_len":
    raw[:8] = (len(raw) + 1).to_bytes(8, "little")
  elif damage == "json":
    raw[8] = ord("x")
  elif damage == "tiny":
    raw = raw[:5]
  else:
    header["w"]["dtype" if damage == "dtype" else "shape"] = "Q7" if damage == "dtype" else [4, 5]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    raw[8 : 8 + n] = text
  path.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=f"{path}.*unreadable.*{match}"):
    safetensors_io.open_safetensors(str(path))
