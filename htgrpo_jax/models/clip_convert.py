"""CLIP checkpoints (Hugging Face ``CLIPModel``, open_clip ``CLIP``) -> ``models.clip`` params.

Read with the project's numpy safetensors reader (``models.convert``; no torch). torch Linear
``weight [out, in]`` -> ``kernel [in, out]`` (W.T); conv ``[O, I, p, p]`` -> ``[p, p, I, O]``;
LayerNorm ``weight`` -> ``scale``.

Hugging Face (``model.safetensors``, ``prefix`` '' for CLIPModel, 'owlv2.' / 'owlvit.' for OWL):
  vision_model.embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight}
  vision_model.pre_layrnorm (OWL: pre_layernorm), vision_model.post_layernorm
  {vision,text}_model.encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm{1,2}, mlp.fc{1,2}}
  text_model.embeddings.{token_embedding, position_embedding}.weight, text_model.final_layer_norm
  visual_projection.weight [P, Dv], text_projection.weight [P, Dt], logit_scale []
open_clip (``open_clip_model.safetensors`` or any ``.safetensors`` of ``model.state_dict()``):
  visual.{conv1.weight, class_embedding, positional_embedding, ln_pre, ln_post, proj [Dv, P]}
  {visual.,}transformer.resblocks.{i}.{ln_1, attn.in_proj_{weight [3D, D], bias}, attn.out_proj,
      ln_2, mlp.c_fc, mlp.c_proj}                    (in_proj rows are q, k, v in that order)
  token_embedding.weight, positional_embedding [L, D], ln_final, text_projection [Dt, P], logit_scale

Buffers (``*.position_ids``, ``attn_mask``) are skipped; any other unexpected key, a missing key
or a wrong shape raises ``ValueError`` naming the tensor before any tensor data is read.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from typing import Any, Callable

import numpy as np

from htgrpo_jax.models import clip
from htgrpo_jax.models import convert as llada_convert
from htgrpo_jax.models import safetensors_io

ParamMap = dict[tuple[str, ...], tuple[str, tuple[int, ...], Callable]]
OPEN_CLIP_SINGLE = "open_clip_model.safetensors"
# Non-persistent buffers some exports still carry; they are regenerated, never read.
BUFFER_SUFFIXES = ("position_ids", "attn_mask")


def _ident(w):
  return w


def _t(w):
  return w.T


def _conv(w):
  return w.transpose(2, 3, 1, 0)


def _add_dense(m: ParamMap, path: tuple, key: str, din: int, dout: int, bias: bool = True) -> None:
  m[path + ("kernel",)] = (key + ".weight", (dout, din), _t)
  if bias:
    m[path + ("bias",)] = (key + ".bias", (dout,), _ident)


def _add_ln(m: ParamMap, path: tuple, key: str, d: int) -> None:
  m[path + ("scale",)] = (key + ".weight", (d,), _ident)
  m[path + ("bias",)] = (key + ".bias", (d,), _ident)


def _hf_layers(m: ParamMap, path: tuple, key: str, n: int, d: int, mlp: int) -> None:
  for i in range(n):
    p, k = path + (f"layers_{i}",), f"{key}.encoder.layers.{i}"
    for q in ("q", "k", "v", "out"):
      _add_dense(m, p + ("self_attn", f"{q}_proj"), f"{k}.self_attn.{q}_proj", d, d)
    _add_ln(m, p + ("layer_norm1",), f"{k}.layer_norm1", d)
    _add_ln(m, p + ("layer_norm2",), f"{k}.layer_norm2", d)
    _add_dense(m, p + ("fc1",), f"{k}.mlp.fc1", d, mlp)
    _add_dense(m, p + ("fc2",), f"{k}.mlp.fc2", mlp, d)


def hf_vision_map(
    c: clip.CLIPConfig, key: str = "vision_model", path: tuple = ("vision_model",), pre_ln: str = "pre_layrnorm"
) -> ParamMap:
  """The vision tower's params from HF keys under ``key`` (``pre_ln``: CLIP's misspelt
  ``pre_layrnorm``, OWL's ``pre_layernorm``)."""
  v, m = c.vision, {}
  d = v.hidden_size
  m[path + ("patch_embedding", "kernel")] = (
      f"{key}.embeddings.patch_embedding.weight",
      (d, 3, v.patch_size, v.patch_size),
      _conv,
  )
  m[path + ("class_embedding",)] = (f"{key}.embeddings.class_embedding", (d,), _ident)
  m[path + ("position_embedding",)] = (f"{key}.embeddings.position_embedding.weight", (v.num_positions, d), _ident)
  _add_ln(m, path + ("pre_layernorm",), f"{key}.{pre_ln}", d)
  _hf_layers(m, path, key, v.num_layers, d, v.mlp_size)
  _add_ln(m, path + ("post_layernorm",), f"{key}.post_layernorm", d)
  return m


def hf_text_map(c: clip.CLIPConfig, key: str = "text_model", path: tuple = ("text_model",)) -> ParamMap:
  """The text tower's params from HF keys under ``key``."""
  t, m = c.text, {}
  d = t.hidden_size
  m[path + ("token_embedding", "embedding")] = (f"{key}.embeddings.token_embedding.weight", (t.vocab_size, d), _ident)
  m[path + ("position_embedding",)] = (f"{key}.embeddings.position_embedding.weight", (t.max_length, d), _ident)
  _hf_layers(m, path, key, t.num_layers, d, t.mlp_size)
  _add_ln(m, path + ("final_layer_norm",), f"{key}.final_layer_norm", d)
  return m


def hf_param_map(c: clip.CLIPConfig, prefix: str = "", path: tuple = (), pre_ln: str = "pre_layrnorm") -> ParamMap:
  """Our flat param path -> (HF key, HF shape, transform) for a whole ``CLIP`` (HF ``CLIPModel``
  keys under ``prefix``, our params under ``path``)."""
  m = {
      **hf_vision_map(c, prefix + "vision_model", path + ("vision_model",), pre_ln),
      **hf_text_map(c, prefix + "text_model", path + ("text_model",)),
  }
  _add_dense(
      m, path + ("visual_projection",), prefix + "visual_projection", c.vision.hidden_size, c.projection_dim, bias=False
  )
  _add_dense(
      m, path + ("text_projection",), prefix + "text_projection", c.text.hidden_size, c.projection_dim, bias=False
  )
  m[path + ("logit_scale",)] = (prefix + "logit_scale", (), _ident)
  return m


def _split_in_proj(i: int, d: int) -> Callable:
  return lambda w: (w[i * d : (i + 1) * d].T if w.ndim == 2 else w[i * d : (i + 1) * d])


def _open_clip_layers(m: ParamMap, path: tuple, key: str, n: int, d: int, mlp: int) -> None:
  for i in range(n):
    p, k = path + (f"layers_{i}",), f"{key}.resblocks.{i}"
    for j, q in enumerate("qkv"):
      m[p + ("self_attn", f"{q}_proj", "kernel")] = (f"{k}.attn.in_proj_weight", (3 * d, d), _split_in_proj(j, d))
      m[p + ("self_attn", f"{q}_proj", "bias")] = (f"{k}.attn.in_proj_bias", (3 * d,), _split_in_proj(j, d))
    _add_dense(m, p + ("self_attn", "out_proj"), f"{k}.attn.out_proj", d, d)
    _add_ln(m, p + ("layer_norm1",), f"{k}.ln_1", d)
    _add_ln(m, p + ("layer_norm2",), f"{k}.ln_2", d)
    _add_dense(m, p + ("fc1",), f"{k}.mlp.c_fc", d, mlp)
    _add_dense(m, p + ("fc2",), f"{k}.mlp.c_proj", mlp, d)


def open_clip_param_map(c: clip.CLIPConfig) -> ParamMap:
  """Our flat param path -> (open_clip key, shape, transform) for open_clip's ``CLIP`` class."""
  v, t, m = c.vision, c.text, {}
  dv, dt = v.hidden_size, t.hidden_size
  m[("vision_model", "patch_embedding", "kernel")] = ("visual.conv1.weight", (dv, 3, v.patch_size, v.patch_size), _conv)
  m[("vision_model", "class_embedding")] = ("visual.class_embedding", (dv,), _ident)
  m[("vision_model", "position_embedding")] = ("visual.positional_embedding", (v.num_positions, dv), _ident)
  _add_ln(m, ("vision_model", "pre_layernorm"), "visual.ln_pre", dv)
  _open_clip_layers(m, ("vision_model",), "visual.transformer", v.num_layers, dv, v.mlp_size)
  _add_ln(m, ("vision_model", "post_layernorm"), "visual.ln_post", dv)
  m[("visual_projection", "kernel")] = ("visual.proj", (dv, c.projection_dim), _ident)
  m[("text_model", "token_embedding", "embedding")] = ("token_embedding.weight", (t.vocab_size, dt), _ident)
  m[("text_model", "position_embedding")] = ("positional_embedding", (t.max_length, dt), _ident)
  _open_clip_layers(m, ("text_model",), "transformer", t.num_layers, dt, t.mlp_size)
  _add_ln(m, ("text_model", "final_layer_norm"), "ln_final", dt)
  m[("text_projection", "kernel")] = ("text_projection", (dt, c.projection_dim), _ident)
  m[("logit_scale",)] = ("logit_scale", (), _ident)
  return m


def tensor_files(path: str, single_files: tuple[str, ...]) -> dict[str, str]:
  """Key -> safetensors file for a ``.safetensors`` file, or a dir holding one of ``single_files``
  or transformers' ``model.safetensors.index.json``."""
  if os.path.isfile(path):
    with safetensors_io.open_safetensors(path) as f:
      return {k: path for k in f.keys()}
  if os.path.exists(os.path.join(path, llada_convert.INDEX_FILE)):
    return llada_convert.read_index(path)
  for name in single_files:
    if os.path.exists(os.path.join(path, name)):
      return llada_convert.read_index(path, single_file=name)
  raise ValueError(
      f"{path!r} is not a safetensors file and holds none of {single_files} " f"or {llada_convert.INDEX_FILE}"
  )


def load_params(
    path: str,
    pmap: ParamMap,
    dtype,
    *,
    mesh=None,
    what: str = "checkpoint",
    single_files: tuple[str, ...] = (llada_convert.SINGLE_FILE,),
    ignore_prefixes: tuple[str, ...] = (),
) -> Any:
  """Validates every key and shape, then reads tensor by tensor into a params pytree.

  Args:
    path: a ``.safetensors`` file or a dir (see ``tensor_files``).
    pmap: our flat path -> (key, shape, transform).
    dtype: param dtype.
    mesh: replicate every param over it (CLIP-sized models are small next to the policy).
    what: names the checkpoint in errors ('CLIP checkpoint', ...).
    ignore_prefixes: keys the model does not use (skipped by name).

  Raises:
    ValueError naming the tensor: missing, unexpected, mis-shaped, non-float or non-finite.
  """
  files = tensor_files(path, single_files)
  expected = {key: shape for key, shape, _ in pmap.values()}
  llada_convert.check_names(
      what,
      path,
      files,
      expected,
      skip=lambda k: k.endswith(BUFFER_SUFFIXES) or k.startswith(ignore_prefixes),
      hint=" (a different architecture or config?)",
  )
  with ExitStack() as stack:
    reader = llada_convert._Reader(files, stack)
    for key, shape in expected.items():
      got = reader.shape(key)
      if got != shape:
        raise ValueError(f"tensor {key} has shape {got}, the config expects {shape}")
    return llada_convert.read_replicated(reader, pmap, dtype, mesh)


def read_hf_config(path: str, **kw) -> clip.CLIPConfig:
  """``clip.from_hf_config`` of the ``config.json`` in ``path`` (a dir, or a file's dir)."""
  d = path if os.path.isdir(path) else os.path.dirname(path)
  cfg = os.path.join(d, "config.json")
  if not os.path.exists(cfg):
    raise ValueError(f"{path!r}: no config.json next to the weights; pass a CLIPConfig")
  with open(cfg) as f:
    return clip.from_hf_config(json.load(f), **kw)


def load_hf_clip(path: str, config: clip.CLIPConfig | None = None, mesh=None) -> tuple[clip.CLIPConfig, Any]:
  """HF ``CLIPModel`` dir (``config.json`` + ``model.safetensors``) or file -> (config, params).

  ``config`` None reads ``config.json``. Params in ``config.param_dtype``; raises ValueError naming
  the tensor on any mismatch.
  """
  config = config or read_hf_config(path)
  params = load_params(path, hf_param_map(config), np.dtype(config.param_dtype), mesh=mesh, what="HF CLIP checkpoint")
  return config, params


def load_open_clip(path: str, config: clip.CLIPConfig, mesh=None) -> Any:
  """open_clip ``CLIP`` state dict as safetensors (file, or dir with ``open_clip_model.safetensors``)
  -> params. ``config``: ``clip.from_open_clip_config(model_cfg, quick_gelu)`` or a preset."""
  return load_params(
      path,
      open_clip_param_map(config),
      np.dtype(config.param_dtype),
      mesh=mesh,
      what="open_clip checkpoint",
      single_files=(OPEN_CLIP_SINGLE, llada_convert.SINGLE_FILE),
  )


def owl_param_map(c) -> ParamMap:
  """Our flat path -> (HF key, shape, transform) for ``owl.OwlDetector`` from
  ``Owlv2ForObjectDetection`` (keys ``owlv2.*``) / ``OwlViTForObjectDetection`` (``owlvit.*``)."""
  cc = c.clip
  dv, dt = cc.vision.hidden_size, cc.text.hidden_size
  m = hf_param_map(cc, prefix=f"{c.kind}.", path=("clip",), pre_ln="pre_layernorm")
  _add_dense(m, ("class_head", "dense0"), "class_head.dense0", dv, dt)
  _add_dense(m, ("class_head", "logit_shift"), "class_head.logit_shift", dv, 1)
  _add_dense(m, ("class_head", "logit_scale"), "class_head.logit_scale", dv, 1)
  heads = (("box_head", 4),) + ((("objectness_head", 1),) if c.kind == "owlv2" else ())
  for head, out in heads:
    _add_dense(m, (head, "dense0"), f"{head}.dense0", dv, dv)
    _add_dense(m, (head, "dense1"), f"{head}.dense1", dv, dv)
    _add_dense(m, (head, "dense2"), f"{head}.dense2", dv, out)
  _add_ln(m, ("layer_norm",), "layer_norm", dv)
  return m


def load_owl(path: str, config=None, mesh=None):
  """HF ``Owlv2ForObjectDetection`` / ``OwlViTForObjectDetection`` dir (``config.json`` +
  ``model.safetensors``) or file -> (``owl.OwlConfig``, params). ``config`` None reads
  ``config.json``; raises ValueError naming the tensor on any mismatch."""
  from htgrpo_jax.models import owl

  if config is None:
    d = path if os.path.isdir(path) else os.path.dirname(path)
    cfg = os.path.join(d, "config.json")
    if not os.path.exists(cfg):
      raise ValueError(f"{path!r}: no config.json next to the weights; pass an OwlConfig")
    with open(cfg) as f:
      config = owl.from_hf_config(json.load(f))
  params = load_params(
      path, owl_param_map(config), np.dtype(config.clip.param_dtype), mesh=mesh, what=f"HF {config.kind} checkpoint"
  )
  return config, params
