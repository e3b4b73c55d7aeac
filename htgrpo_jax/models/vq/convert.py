"""HF VQ checkpoints (MMaDA's MAGVIT-v2, DiMOO's diffusers ``VQModel``) -> Flax decoder params.

torch -> Flax layouts (docs/models.md, VQ decoders): conv ``weight [O, I, kh, kw]`` -> ``kernel [kh, kw, I, O]``
(HWIO, NHWC convs), conv/GroupNorm ``bias [C]`` -> ``bias``, GroupNorm ``weight [C]`` -> ``scale``,
codebook ``quantize.embedding.weight [K, C]`` -> ``codebook`` (as is).

MAGVIT-v2 (``decoder.*``; ``up.{l}`` with l = 0 the full-resolution level):
  decoder.post_quant_conv / conv_in / conv_out       -> post_quant_conv / conv_in / conv_out
  decoder.mid.block_{1,2}.{norm1,conv1,norm2,conv2}  -> mid_block_{1,2}.*
  decoder.mid.attn_1.{norm,q,k,v,proj_out}           -> mid_attn_1.*
  decoder.up.{l}.block.{j}.{...,nin_shortcut}        -> up_{l}_block_{j}.*
  decoder.up.{l}.upsample.conv                       -> up_{l}_upsample.conv
  decoder.norm_out                                   -> norm_out
  quantize.embedding [2^b, b], quantize.power_vals [b]: regenerated buffers; checked when present.

DiMOO VQModel (``up_blocks.{i}`` with i = 0 the LOW-resolution level):
  quantize.embedding.weight                          -> codebook
  post_quant_conv                                    -> post_quant_conv
  decoder.conv_in / conv_norm_out / conv_out         -> conv_in / conv_norm_out / conv_out
  decoder.mid_block.resnets.{j}.*                    -> mid_{j}.*
  decoder.up_blocks.{i}.resnets.{j}.{...,conv_shortcut} -> up_{i}_res_{j}.*
  decoder.up_blocks.{i}.upsamplers.0.conv            -> up_{i}_upsample.conv

Encoder tensors (``encoder.*``, ``quant_conv.*``) are for image encoding and are skipped by name;
any other key the decoder does not consume, a missing key or a wrong shape raises ``ValueError``
naming the tensor, before any tensor data is read. Tensors are then read one at a time.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from htgrpo_jax.models import convert as llada_convert
from htgrpo_jax.models import safetensors_io
from htgrpo_jax.models.vq import magvit2, vqgan

# Decode never touches the encoder; these prefixes are the only keys a full VQ checkpoint may have
# beyond the decoder's.
ENCODER_PREFIXES = ("encoder.", "quant_conv.")
DIFFUSERS_SINGLE = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_SINGLE + ".index.json"

ParamMap = dict[tuple[str, ...], tuple[str, tuple[int, ...], Callable]]


def _conv_kernel(w):
  return w.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]


def _ident(w):
  return w


def _add_conv(m: ParamMap, path: tuple[str, ...], hf: str, cin: int, cout: int, k: int) -> None:
  m[path + ("kernel",)] = (hf + ".weight", (cout, cin, k, k), _conv_kernel)
  m[path + ("bias",)] = (hf + ".bias", (cout,), _ident)


def _add_norm(m: ParamMap, path: tuple[str, ...], hf: str, c: int) -> None:
  m[path + ("scale",)] = (hf + ".weight", (c,), _ident)
  m[path + ("bias",)] = (hf + ".bias", (c,), _ident)


def _add_resblock(m: ParamMap, path: tuple[str, ...], hf: str, cin: int, cout: int, shortcut: str) -> None:
  _add_norm(m, path + ("norm1",), hf + ".norm1", cin)
  _add_conv(m, path + ("conv1",), hf + ".conv1", cin, cout, 3)
  _add_norm(m, path + ("norm2",), hf + ".norm2", cout)
  _add_conv(m, path + ("conv2",), hf + ".conv2", cout, cout, 3)
  if cin != cout:
    _add_conv(m, path + (shortcut,), f"{hf}.{shortcut}", cin, cout, 1)


def magvit2_param_map(c: magvit2.Magvit2Config) -> ParamMap:
  """Our flat param path -> (HF key, HF shape, transform HF array -> our array)."""
  m: ParamMap = {}
  top = c.ch * c.ch_mult[-1]
  _add_conv(m, ("post_quant_conv",), "decoder.post_quant_conv", c.code_bits, c.code_bits, 1)
  _add_conv(m, ("conv_in",), "decoder.conv_in", c.code_bits, top, 3)
  _add_resblock(m, ("mid_block_1",), "decoder.mid.block_1", top, top, "nin_shortcut")
  _add_norm(m, ("mid_attn_1", "norm"), "decoder.mid.attn_1.norm", top)
  for n in ("q", "k", "v", "proj_out"):
    _add_conv(m, ("mid_attn_1", n), f"decoder.mid.attn_1.{n}", top, top, 1)
  _add_resblock(m, ("mid_block_2",), "decoder.mid.block_2", top, top, "nin_shortcut")
  cin = top
  for level in reversed(range(len(c.ch_mult))):
    cout = c.ch * c.ch_mult[level]
    for j in range(c.num_res_blocks[level]):
      _add_resblock(m, (f"up_{level}_block_{j}",), f"decoder.up.{level}.block.{j}", cin, cout, "nin_shortcut")
      cin = cout
    if level:
      _add_conv(m, (f"up_{level}_upsample", "conv"), f"decoder.up.{level}.upsample.conv", cout, cout, 3)
  _add_norm(m, ("norm_out",), "decoder.norm_out", cin)
  _add_conv(m, ("conv_out",), "decoder.conv_out", cin, c.out_channels, 3)
  return m


def vqgan_param_map(c: vqgan.VQGANConfig) -> ParamMap:
  """Our flat param path -> (HF key, HF shape, transform HF array -> our array)."""
  m: ParamMap = {}
  lat, top = c.latent_channels, c.block_out_channels[-1]
  m[("codebook",)] = ("quantize.embedding.weight", (c.num_vq_embeddings, lat), _ident)
  _add_conv(m, ("post_quant_conv",), "post_quant_conv", lat, lat, 1)
  _add_conv(m, ("conv_in",), "decoder.conv_in", lat, top, 3)
  for j in range(2):
    _add_resblock(m, (f"mid_{j}",), f"decoder.mid_block.resnets.{j}", top, top, "conv_shortcut")
  ups = c.up_channels()
  for i, (cin, cout) in enumerate(ups):
    for j in range(c.layers_per_block + 1):
      _add_resblock(
          m, (f"up_{i}_res_{j}",), f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout, "conv_shortcut"
      )
    if i < len(ups) - 1:
      _add_conv(m, (f"up_{i}_upsample", "conv"), f"decoder.up_blocks.{i}.upsamplers.0.conv", cout, cout, 3)
  last = ups[-1][1]
  _add_norm(m, ("conv_norm_out",), "decoder.conv_norm_out", last)
  _add_conv(m, ("conv_out",), "decoder.conv_out", last, c.out_channels, 3)
  return m


def tensor_files(path: str) -> dict[str, str]:
  """HF key -> safetensors file, for a ``.safetensors`` file or a directory holding
  ``model.safetensors[.index.json]`` or diffusers' ``diffusion_pytorch_model.safetensors[.index.json]``."""
  if os.path.isfile(path):
    with safetensors_io.open_safetensors(path) as f:
      return {k: path for k in f.keys()}
  for index, single in ((llada_convert.INDEX_FILE, llada_convert.SINGLE_FILE), (DIFFUSERS_INDEX, DIFFUSERS_SINGLE)):
    if any(os.path.exists(os.path.join(path, n)) for n in (index, single)):
      return llada_convert.read_index(path, index, single)
  raise ValueError(
      f"{path!r} is not a safetensors file and has no {llada_convert.SINGLE_FILE}, "
      f"{DIFFUSERS_SINGLE} or their index"
  )


def _check_keys(
    path: str, files: dict[str, str], expected: dict[str, tuple[int, ...]], optional: dict[str, tuple[int, ...]], reader
) -> None:
  llada_convert.check_names(
      "VQ checkpoint", path, files, expected, skip=lambda k: k in optional or k.startswith(ENCODER_PREFIXES)
  )
  for key, shape in {**expected, **{k: s for k, s in optional.items() if k in files}}.items():
    got = reader.shape(key)
    if got != shape:
      raise ValueError(f"tensor {key} has shape {got}, the decoder config expects {shape}")


def _load(path: str, pmap: ParamMap, dtype, mesh, optional=None) -> Any:
  """Validates every key/shape, then reads tensor by tensor into a (replicated) params pytree.

  ``optional``: HF key -> (shape, expected value) for regenerable buffers: checked when present.
  """
  optional = optional or {}
  files = tensor_files(path)
  expected = {key: shape for key, shape, _ in pmap.values()}
  with ExitStack() as stack:
    reader = llada_convert._Reader(files, stack)
    _check_keys(path, files, expected, {k: s for k, (s, _) in optional.items()}, reader)
    for key, (_, want) in optional.items():
      if key in files and not np.array_equal(np.asarray(reader.get(key), np.float64), want):
        raise ValueError(f"tensor {key} differs from the regenerated buffer (bit order or size)")
    return llada_convert.read_replicated(reader, pmap, dtype, mesh)


def check_vqgan_config(path: str, c: vqgan.VQGANConfig) -> None:
  """Compares a diffusers ``config.json`` next to the weights (when present) with the config;
  raises ValueError naming the key."""
  cfg = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
  if not os.path.exists(cfg):
    return
  with open(cfg) as f:
    hf = json.load(f)
  want = {
      "block_out_channels": list(c.block_out_channels),
      "layers_per_block": c.layers_per_block,
      "latent_channels": c.latent_channels,
      "num_vq_embeddings": c.num_vq_embeddings,
      "norm_num_groups": c.norm_num_groups,
      "out_channels": c.out_channels,
      "norm_type": "group",
      "mid_block_add_attention": False,
      "act_fn": "silu",
  }
  for key, val in want.items():
    if key in hf and hf[key] != val:
      raise ValueError(f"config.json {key}={hf[key]!r} does not match the decoder config ({val!r})")
  if hf.get("vq_embed_dim") not in (None, c.latent_channels):
    raise ValueError(f"config.json vq_embed_dim={hf['vq_embed_dim']!r} != latent_channels {c.latent_channels}")


def load_magvit2_params(path: str, config: magvit2.Magvit2Config = magvit2.PRESETS["mmada"], mesh=None) -> Any:
  """MAGVIT-v2 checkpoint (file or dir) -> ``Magvit2Decoder`` params in ``config.param_dtype``.

  With ``mesh`` every param is replicated over it. Raises ValueError on a missing, unexpected or
  mis-shaped tensor (named), or LFQ buffers that disagree with the MSB-first bit table.
  """
  b = config.code_bits
  codes = np.arange(config.codebook_size)
  table = np.asarray(magvit2.lfq_embed(jnp.asarray(codes), b), np.float64)
  optional = {
      "quantize.embedding": ((config.codebook_size, b), table),
      "quantize.power_vals": ((b,), 2.0 ** np.arange(b - 1, -1, -1)),
  }
  return _load(path, magvit2_param_map(config), np.dtype(config.param_dtype), mesh, optional)


def load_vqgan_params(path: str, config: vqgan.VQGANConfig = vqgan.PRESETS["dimoo"], mesh=None) -> Any:
  """DiMOO ``vqvae`` checkpoint (file or the ``vqvae`` dir) -> ``VQGANDecoder`` params.

  With ``mesh`` every param is replicated over it. Raises ValueError on a missing, unexpected or
  mis-shaped tensor (named) or a ``config.json`` that disagrees with ``config``.
  """
  check_vqgan_config(path, config)
  return _load(path, vqgan_param_map(config), np.dtype(config.param_dtype), mesh)
