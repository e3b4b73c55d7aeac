"""CLIP (Radford et al., 2021) in Flax Linen: the vision and text towers, projections, logit scale.

One module for every checkpoint layout (converters in ``clip_convert.py``): Hugging Face
``CLIPModel`` and open_clip's ``CLIP`` compute the same function, and OWL-ViT / OWLv2 (``owl.py``)
reuse both towers, keeping the vision tower's patch tokens.

Vision tower (pre-LN ViT), pixels ``[B, S, S, 3]`` float (normalised, NHWC):
  x = conv_pxp(pixels, no bias) -> [B, (S/p)^2, D]; x = [class_embedding; x] + position_embedding
  x = pre_layernorm(x); x = layers(x)                       (non-causal)
  tokens = post_layernorm(x)  [B, 1 + (S/p)^2, D]            (CLIP pools tokens[:, 0]; OWL keeps all)
Text tower, ids ``[B, L]`` int32:
  x = token_embedding(ids) + position_embedding[:L]; x = layers(x, causal); x = final_layer_norm(x)
  pooled = x[b, eos_position(ids)]                           (``TextConfig.eos_token_id``)
Each layer: ``x + attn(layer_norm1(x))``, then ``x + fc2(act(fc1(layer_norm2(x))))``; attention
with biased q/k/v/out projections, softmax in float32. ``act`` is ``quick_gelu`` (x * sigmoid(1.702 x),
OpenAI's checkpoints) or ``gelu`` (exact erf; LAION/open_clip models trained without QuickGELU).
Features: ``visual_projection(pooled)`` / ``text_projection(pooled)`` (no bias), unnormalised as
HF's ``get_image_features``; ``logit_scale`` is stored as its log, as in both references.

Padding masks are not taken: with the causal mask and EOS pooling, tokens after the EOS (the
padding of right-padded batches) cannot reach the pooled state, so HF's ``attention_mask`` does
not change the features of right-padded ids (what every CLIP tokenizer produces).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

ACTIVATIONS = ("quick_gelu", "gelu")


def activation(name: str, x: jax.Array) -> jax.Array:
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  raise ValueError(f"activation {name!r}; expected one of {ACTIVATIONS}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """ViT sizes (HF ``CLIPVisionConfig`` names). Patch grid ``image_size // patch_size`` squared."""

  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_size: int = 3072
  patch_size: int = 32
  image_size: int = 224
  act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    return self.grid**2 + 1


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Text transformer sizes (HF ``CLIPTextConfig`` names).

  ``eos_token_id``: how the pooled token is found. None, or 2 (HF configs written before
  transformers PR #24773 carry 2), pools at ``argmax(ids)`` (the EOS is the largest id in CLIP's
  BPE vocabulary; OpenAI, open_clip, OWL-ViT and OWLv2 all do this); any other id pools at the
  first position holding it (HF's rule for such configs, which works with added tokens).
  """

  vocab_size: int = 49408
  hidden_size: int = 512
  num_layers: int = 12
  num_heads: int = 8
  mlp_size: int = 2048
  max_length: int = 77
  act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int | None = None


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A CLIP model: towers, shared projection width, compute/param dtypes."""

  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  projection_dim: int = 512
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    for name, tower in (("vision", self.vision), ("text", self.text)):
      if tower.act not in ACTIVATIONS:
        raise ValueError(f"CLIPConfig.{name}.act={tower.act!r}; expected one of {ACTIVATIONS}")
      if tower.hidden_size % tower.num_heads:
        raise ValueError(
            f"CLIPConfig.{name}: hidden_size {tower.hidden_size} not divisible by " f"num_heads {tower.num_heads}"
        )
    if self.vision.image_size % self.vision.patch_size:
      raise ValueError(
          f"CLIPConfig.vision: image_size {self.vision.image_size} not divisible by "
          f"patch_size {self.vision.patch_size}"
      )


PRESETS: dict[str, CLIPConfig] = {
    # openai/clip-vit-base-patch32 (open_clip "ViT-B-32", pretrained="openai"): ~151M params.
    "vit_b32": CLIPConfig(),
    # openai/clip-vit-large-patch14 (open_clip "ViT-L-14", pretrained="openai"; GenEval's colour
    # classifier): ~428M params.
    "vit_l14": CLIPConfig(
        vision=VisionConfig(hidden_size=1024, num_layers=24, num_heads=16, mlp_size=4096, patch_size=14),
        text=TextConfig(hidden_size=768, num_layers=12, num_heads=12, mlp_size=3072),
        projection_dim=768,
    ),
    # Unit tests.
    "tiny": CLIPConfig(
        vision=VisionConfig(hidden_size=32, num_layers=2, num_heads=4, mlp_size=64, patch_size=8, image_size=32),
        text=TextConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, mlp_size=64, max_length=16),
        projection_dim=24,
    ),
}


def from_hf_config(hf: Any, **kw) -> CLIPConfig:
  """``CLIPConfig`` from a transformers ``CLIPConfig`` (or its ``to_dict()`` / ``config.json`` dict).

  ``kw`` go to ``CLIPConfig`` (``dtype``, ``param_dtype``). Raises ValueError naming the field
  when the activation is one this module does not have.
  """
  hf = hf if isinstance(hf, dict) else hf.to_dict()
  v, t = hf["vision_config"], hf["text_config"]
  for name, tower in (("vision_config", v), ("text_config", t)):
    if tower.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
      raise ValueError(f"{name}.hidden_act={tower['hidden_act']!r}; expected one of {ACTIVATIONS}")
  vision = VisionConfig(
      hidden_size=v["hidden_size"],
      num_layers=v["num_hidden_layers"],
      num_heads=v["num_attention_heads"],
      mlp_size=v["intermediate_size"],
      patch_size=v["patch_size"],
      image_size=v["image_size"],
      act=v.get("hidden_act", "quick_gelu"),
      layer_norm_eps=v.get("layer_norm_eps", 1e-5),
  )
  text = TextConfig(
      vocab_size=t["vocab_size"],
      hidden_size=t["hidden_size"],
      num_layers=t["num_hidden_layers"],
      num_heads=t["num_attention_heads"],
      mlp_size=t["intermediate_size"],
      max_length=t["max_position_embeddings"],
      act=t.get("hidden_act", "quick_gelu"),
      layer_norm_eps=t.get("layer_norm_eps", 1e-5),
      eos_token_id=t.get("eos_token_id"),
  )
  return CLIPConfig(vision=vision, text=text, projection_dim=hf["projection_dim"], **kw)


def from_open_clip_config(cfg: dict, quick_gelu: bool = False, **kw) -> CLIPConfig:
  """``CLIPConfig`` from an open_clip model config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``;
  the JSON files in open_clip's ``model_configs/``). ``quick_gelu``: open_clip's flag (True for the
  OpenAI weights, e.g. ``pretrained="openai"``; also set by ``-quickgelu`` model names).

  Raises:
    ValueError naming the option for towers this module does not implement (timm or HF towers,
    non-ViT vision, attentional pooling, layer scale, non-argmax text pooling, ...).
  """
  v, t = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
  if isinstance(v.get("layers"), (list, tuple)) or v.get("timm_model_name") or t.get("hf_model_name"):
    raise ValueError(
        "open_clip config: only the ViT vision tower and the built-in text transformer "
        "are supported (vision_cfg.layers is a list / timm_model_name / hf_model_name set)"
    )
  unsupported = {
      "vision_cfg.ls_init_value": v.get("ls_init_value"),
      "vision_cfg.attentional_pool": v.get("attentional_pool"),
      "vision_cfg.no_ln_pre": v.get("no_ln_pre"),
      "vision_cfg.final_ln_after_pool": v.get("final_ln_after_pool"),
      "text_cfg.ls_init_value": t.get("ls_init_value"),
      "text_cfg.embed_cls": t.get("embed_cls"),
      "text_cfg.no_causal_mask": t.get("no_causal_mask"),
      "text_cfg.proj_bias": t.get("proj_bias"),
      "init_logit_bias": cfg.get("init_logit_bias"),
  }
  for key, val in unsupported.items():
    if val:
      raise ValueError(f"open_clip config: {key}={val!r} is not supported")
  if v.get("pool_type", "tok") != "tok" or v.get("global_average_pool"):
    raise ValueError(
        f"open_clip config: vision_cfg.pool_type={v.get('pool_type')!r} / global_average_pool "
        "is not supported (class-token pooling only)"
    )
  if t.get("pool_type", "argmax") != "argmax":
    raise ValueError(f"open_clip config: text_cfg.pool_type={t['pool_type']!r} is not supported (argmax only)")
  if t.get("proj_type", "linear") != "linear":
    raise ValueError(f"open_clip config: text_cfg.proj_type={t['proj_type']!r} is not supported")
  act = "quick_gelu" if quick_gelu else "gelu"
  width, head_width = v["width"], v.get("head_width", 64)
  vision = VisionConfig(
      hidden_size=width,
      num_layers=v["layers"],
      num_heads=width // head_width,
      mlp_size=int(width * v.get("mlp_ratio", 4.0)),
      patch_size=v["patch_size"],
      image_size=v["image_size"],
      act=act,
  )
  tw = t.get("width", 512)
  text = TextConfig(
      vocab_size=t.get("vocab_size", 49408),
      hidden_size=tw,
      num_layers=t.get("layers", 12),
      num_heads=t.get("heads", 8),
      mlp_size=int(tw * t.get("mlp_ratio", 4.0)),
      max_length=t.get("context_length", 77),
      act=act,
  )
  return CLIPConfig(vision=vision, text=text, projection_dim=cfg["embed_dim"], **kw)


# --------------------------------------------------------------------------------------------
# Layers.


def _dense(n: int, name: str, cfg: CLIPConfig, bias: bool = True) -> nn.Dense:
  return nn.Dense(n, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


def _ln(eps: float, name: str, cfg: CLIPConfig) -> nn.LayerNorm:
  # Two-pass variance as torch computes it (residual streams of trained CLIPs reach |x| ~ 1e2).
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


class Attention(nn.Module):
  """Multi-head self-attention, ``[B, L, D] -> [B, L, D]``; ``mask`` bool ``[L, L]`` (True = attend)."""

  num_heads: int
  config: CLIPConfig

  @nn.compact
  def __call__(self, x, mask=None):
    b, n, d = x.shape
    h = self.num_heads
    q, k, v = (_dense(d, f"{p}_proj", self.config)(x).reshape(b, n, h, d // h) for p in "qkv")
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (d // h) ** -0.5
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    a = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, n, d)
    return _dense(d, "out_proj", self.config)(o)


class EncoderLayer(nn.Module):
  """Pre-LN transformer block (HF ``CLIPEncoderLayer`` names)."""

  num_heads: int
  mlp_size: int
  act: str
  eps: float
  config: CLIPConfig

  @nn.compact
  def __call__(self, x, mask=None):
    c = self.config
    x = x + Attention(self.num_heads, c, name="self_attn")(_ln(self.eps, "layer_norm1", c)(x), mask)
    y = _ln(self.eps, "layer_norm2", c)(x)
    y = _dense(self.mlp_size, "fc1", c)(y)
    y = _dense(x.shape[-1], "fc2", c)(activation(self.act, y))
    return x + y


class VisionTransformer(nn.Module):
  """pixels ``[B, S, S, 3]`` (normalised) -> tokens ``[B, 1 + (S/p)^2, D]`` after ``post_layernorm``.

  Token 0 is the class token (CLIP's pooled output); tokens 1.. are the patches in row-major order
  (OWL's feature map). Params: ``patch_embedding``, ``class_embedding [D]``,
  ``position_embedding [1 + (S/p)^2, D]``, ``pre_layernorm``, ``layers_{i}``, ``post_layernorm``.
  """

  config: CLIPConfig

  @nn.compact
  def __call__(self, pixels):
    c, v = self.config, self.config.vision
    p, d = v.patch_size, v.hidden_size
    if pixels.shape[1:] != (v.image_size, v.image_size, 3):
      raise ValueError(f"CLIP vision tower: pixels {pixels.shape} must be [B, {v.image_size}, " f"{v.image_size}, 3]")
    x = nn.Conv(
        d,
        (p, p),
        strides=(p, p),
        padding="VALID",
        use_bias=False,
        dtype=c.dtype,
        param_dtype=c.param_dtype,
        name="patch_embedding",
    )(pixels.astype(c.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, d)
    init = nn.initializers.normal(0.02)
    cls = self.param("class_embedding", init, (d,), c.param_dtype)
    pos = self.param("position_embedding", init, (v.num_positions, d), c.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(c.dtype), (b, 1, d)), x], axis=1) + pos.astype(c.dtype)
    x = _ln(v.layer_norm_eps, "pre_layernorm", c)(x)
    for i in range(v.num_layers):
      x = EncoderLayer(v.num_heads, v.mlp_size, v.act, v.layer_norm_eps, c, name=f"layers_{i}")(x)
    return _ln(v.layer_norm_eps, "post_layernorm", c)(x)


def eos_positions(ids: jax.Array, eos_token_id: int | None) -> jax.Array:
  """``int32[B]``: the pooled position of each row of ``ids [B, L]`` (``TextConfig.eos_token_id``)."""
  if eos_token_id is None or eos_token_id == 2:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax(ids == eos_token_id, axis=-1)


class TextTransformer(nn.Module):
  """ids ``[B, L] int32`` -> (tokens ``[B, L, D]`` after ``final_layer_norm``, pooled ``[B, D]``).

  Params: ``token_embedding``, ``position_embedding [max_length, D]``, ``layers_{i}``,
  ``final_layer_norm``.
  """

  config: CLIPConfig

  @nn.compact
  def __call__(self, ids):
    c, t = self.config, self.config.text
    n = ids.shape[-1]
    if n > t.max_length:
      raise ValueError(f"CLIP text tower: {n} tokens > max_length {t.max_length}")
    x = nn.Embed(t.vocab_size, t.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype, name="token_embedding")(ids)
    pos = self.param("position_embedding", nn.initializers.normal(0.01), (t.max_length, t.hidden_size), c.param_dtype)
    x = x + pos[:n].astype(c.dtype)
    mask = jnp.tril(jnp.ones((n, n), bool))
    for i in range(t.num_layers):
      x = EncoderLayer(t.num_heads, t.mlp_size, t.act, t.layer_norm_eps, c, name=f"layers_{i}")(x, mask)
    x = _ln(t.layer_norm_eps, "final_layer_norm", c)(x)
    pooled = jnp.take_along_axis(x, eos_positions(ids, t.eos_token_id)[:, None, None], axis=1)[:, 0]
    return x, pooled


class CLIP(nn.Module):
  """Both towers, ``visual_projection``, ``text_projection`` (no bias) and ``logit_scale`` (log).

  ``__call__(pixels, ids)`` -> (image features ``[B, P]``, text features ``[B', P]``), unnormalised;
  ``encode_image`` / ``encode_text`` run one tower (``model.apply(v, x, method='encode_image')``).
  """

  config: CLIPConfig

  def setup(self):
    c = self.config
    self.vision_model = VisionTransformer(c)
    self.text_model = TextTransformer(c)
    self.visual_projection = _dense(c.projection_dim, "visual_projection", c, bias=False)
    self.text_projection = _dense(c.projection_dim, "text_projection", c, bias=False)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), (), c.param_dtype)

  def encode_image(self, pixels):
    """pixels ``[B, S, S, 3]`` normalised -> ``[B, P]`` (HF ``get_image_features``)."""
    return self.visual_projection(self.vision_model(pixels)[:, 0])

  def encode_text(self, ids):
    """ids ``[B, L] int32`` -> ``[B, P]`` (HF ``get_text_features``)."""
    return self.text_projection(self.text_model(ids)[1])

  def __call__(self, pixels, ids):
    return self.encode_image(pixels), self.encode_text(ids)


def normalize(x: jax.Array, eps: float = 0.0) -> jax.Array:
  """``x / ||x||`` over the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + eps)


def init_params(config: CLIPConfig, seed: int = 0) -> Any:
  """Random params (shapes for converters and tests)."""
  v = config.vision
  pixels = jnp.zeros((1, v.image_size, v.image_size, 3), jnp.float32)
  ids = jnp.zeros((1, config.text.max_length), jnp.int32)
  return CLIP(config).init(jax.random.key(seed), pixels, ids)["params"]


def image_features(params: Any, pixels: jax.Array, config: CLIPConfig) -> jax.Array:
  """``float32[B, P]`` unit-norm image embeddings of normalised ``pixels [B, S, S, 3]``; jittable."""
  return normalize(CLIP(config).apply({"params": params}, pixels, method="encode_image"))


def text_features(params: Any, ids: jax.Array, config: CLIPConfig) -> jax.Array:
  """``float32[B, P]`` unit-norm text embeddings of token ids ``[B, L]``; jittable."""
  return normalize(CLIP(config).apply({"params": params}, ids, method="encode_text"))


def load_tokenizer(path: str) -> Any:
  """The CLIP tokenizer saved in the local dir ``path`` (``transformers.AutoTokenizer``; never
  downloads). Raises ValueError naming the dir when it holds no tokenizer."""
  from transformers import AutoTokenizer

  try:
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError) as e:
    raise ValueError(f"tokenizer dir {path!r}: {type(e).__name__}: {e}") from None


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> np.ndarray:
  """``int32[len(texts), max_length]``: BOS, tokens, EOS, right padding (truncated keeping the EOS,
  as CLIP's tokenizers do)."""
  if isinstance(texts, str):
    raise ValueError("tokenize(): texts must be a list of strings, got a bare string")
  out = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
  return np.asarray(out["input_ids"], np.int32)
