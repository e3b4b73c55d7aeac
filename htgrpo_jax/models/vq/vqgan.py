"""aMUSEd-style VQ-GAN decoder (Lumina-DiMOO's diffusers ``VQModel``) in Flax Linen, NHWC.

Also holds the taming-VQGAN building blocks (GroupNorm-SiLU-conv resnet, single-head spatial
attention, nearest-2x upsampler) that MAGVIT-v2's decoder shares (``magvit2.py`` imports them).

Decode path (docs/models.md, aMUSEd-style VQ-GAN), codes ``[B, h, w]`` -> pixels ``[B, 16h, 16w, 3]``:

  z = codebook[codes]                                   [B, h, w, 64]   (plain embedding lookup)
  z = post_quant_conv(z)                                1x1, 64 -> 64
  x = conv_in(z)                                        3x3, 64 -> 768
  x = mid resnets x2                                    768 (no attention)
  up blocks 0..4 (768, 512, 256, 256, 128): 3 resnets each (1x1 shortcut when channels change),
      blocks 0..3 end with nearest 2x + conv3x3          (up block 0 is the LOW-res level)
  x = conv_out(silu(GroupNorm(x)))                      3x3, 128 -> 3; pixels in [0, 1] after clip

DiMOO's image slots carry a newline token (126084) after every row of codes; ``strip_newlines``
turns such a slot sequence into the ``[B, h, w]`` grid ``decode`` wants.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

# --------------------------------------------------------------------------------------------
# Shared taming-VQGAN blocks (NHWC).


def group_norm(groups: int, eps: float, name: str, dtype, param_dtype) -> nn.GroupNorm:
  """torch ``GroupNorm(groups, C, eps, affine=True)`` over NHWC; params ``scale, bias [C]``."""
  # Two-pass variance as torch does: decoder activations reach |x| ~ 1e2, where E[x^2]-E[x]^2
  # loses digits in fp32.
  return nn.GroupNorm(
      num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name
  )


def conv(features: int, k: int, name: str, dtype, param_dtype) -> nn.Conv:
  """Stride-1 ``k x k`` conv with torch's ``padding=k//2``; kernel ``[k, k, in, out]`` (HWIO)."""
  p = k // 2
  return nn.Conv(features, (k, k), padding=((p, p), (p, p)), dtype=dtype, param_dtype=param_dtype, name=name)


class ResBlock(nn.Module):
  """``x + conv2(silu(GN2(conv1(silu(GN1(x))))))``, shortcut 1x1 conv when channels change.

  ``shortcut`` names the 1x1 conv (``nin_shortcut`` in MAGVIT-v2, ``conv_shortcut`` in diffusers).
  Input ``[B, H, W, Cin]``, output ``[B, H, W, out_ch]`` in ``dtype``.
  """

  out_ch: int
  groups: int
  eps: float
  shortcut: str
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d, pd = self.dtype, self.param_dtype
    h = nn.silu(group_norm(self.groups, self.eps, "norm1", d, pd)(x))
    h = conv(self.out_ch, 3, "conv1", d, pd)(h)
    h = nn.silu(group_norm(self.groups, self.eps, "norm2", d, pd)(h))
    h = conv(self.out_ch, 3, "conv2", d, pd)(h)  # dropout is 0 in both references
    if x.shape[-1] != self.out_ch:
      x = conv(self.out_ch, 1, self.shortcut, d, pd)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all ``H*W`` positions, 1x1 q/k/v/proj_out, scale ``C^-0.5``.

  ``[B, H, W, C] -> [B, H, W, C]`` (residual).
  """

  groups: int
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    d, pd = self.dtype, self.param_dtype
    h = group_norm(self.groups, self.eps, "norm", d, pd)(x)
    q, k, v = (conv(c, 1, n, d, pd)(h).reshape(b, hh * ww, 1, c) for n in ("q", "k", "v"))
    # One head of width C: dot_product_attention's default scale 1/sqrt(C) is the reference's.
    a = jax.nn.dot_product_attention(q, k, v).reshape(b, hh, ww, c)
    return x + conv(c, 1, "proj_out", d, pd)(a)


def upsample_nearest2x(x: jax.Array) -> jax.Array:
  """torch ``interpolate(scale_factor=2, mode='nearest')``: ``[B, H, W, C] -> [B, 2H, 2W, C]``."""
  b, h, w, c = x.shape
  # Broadcast + reshape copies each pixel into a 2x2 block, exactly nearest-neighbour 2x
  # (jax.image.resize 'nearest' uses half-pixel centres and may pick other source pixels).
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


class Upsample(nn.Module):
  """Nearest 2x then 3x3 conv (``<prefix>.conv``), channels kept."""

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return conv(x.shape[-1], 3, "conv", self.dtype, self.param_dtype)(upsample_nearest2x(x))


# --------------------------------------------------------------------------------------------
# The aMUSEd / DiMOO VQModel decoder.


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
  """Sizes of a diffusers ``VQModel`` decoder (``vqvae/config.json`` names).

  Attributes:
    block_out_channels: encoder-order channels (low index = full resolution); the decoder's up
      blocks run them reversed. Downsampling factor = 2**(len - 1).
    layers_per_block: resnets per encoder block; decoder up blocks have one more.
    latent_channels: codebook vector width (``vq_embed_dim`` null -> = latent_channels).
    num_vq_embeddings: codebook rows.
    norm_num_groups / norm_eps: every GroupNorm.
    code_offset: DiMOO token id of code 0 (image ids = code + offset).
    newline_id: DiMOO's row separator token.
    dtype: compute dtype (fp32 as the reference; bf16 halves activation memory on TPU).
    param_dtype: parameter storage dtype.
  """

  block_out_channels: tuple[int, ...] = (128, 256, 256, 512, 768)
  layers_per_block: int = 2
  latent_channels: int = 64
  num_vq_embeddings: int = 8192
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  out_channels: int = 3
  code_offset: int = 126356
  newline_id: int = 126084
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"VQGANConfig: channels {c} not divisible by norm_num_groups={self.norm_num_groups}")

  @property
  def scale(self) -> int:
    """Pixels per code along each axis."""
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def codebook_size(self) -> int:
    """= ``num_vq_embeddings`` (the name ``Magvit2Config`` uses too)."""
    return self.num_vq_embeddings

  def up_channels(self) -> list[tuple[int, int]]:
    """(in, out) channels of up blocks 0..n-1 (block 0 = lowest resolution)."""
    rev = self.block_out_channels[::-1]
    return [(rev[max(i - 1, 0)], rev[i]) for i in range(len(rev))]


PRESETS: dict[str, VQGANConfig] = {
    # Lumina-DiMOO vqvae (= amused-512): ~88M decoder params.
    "dimoo": VQGANConfig(),
    # Unit tests: 3 levels (4x), few channels.
    "tiny": VQGANConfig(
        block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=8, num_vq_embeddings=64, norm_num_groups=8
    ),
}


class VQGANDecoder(nn.Module):
  """codes ``[B, h, w] int32`` -> raw decoder output ``[B, h*s, w*s, 3]`` (``s = config.scale``).

  Params: ``codebook [K, C]``, ``post_quant_conv``, ``conv_in``, ``mid_{0,1}``,
  ``up_{i}_res_{j}``, ``up_{i}_upsample`` (i < n-1), ``conv_norm_out``, ``conv_out``.
  Codes outside ``[0, K)`` are clipped (a real rollout never produces them).
  """

  config: VQGANConfig

  @nn.compact
  def __call__(self, codes):
    c = self.config
    d, pd, g, eps = c.dtype, c.param_dtype, c.norm_num_groups, c.norm_eps
    table = self.param("codebook", nn.initializers.normal(1.0), (c.num_vq_embeddings, c.latent_channels), pd)
    z = jnp.take(table, jnp.clip(codes, 0, c.num_vq_embeddings - 1), axis=0).astype(d)
    z = conv(c.latent_channels, 1, "post_quant_conv", d, pd)(z)
    x = conv(c.block_out_channels[-1], 3, "conv_in", d, pd)(z)
    for j in range(2):
      x = ResBlock(x.shape[-1], g, eps, "conv_shortcut", d, pd, name=f"mid_{j}")(x)
    ups = c.up_channels()
    for i, (_, out) in enumerate(ups):
      for j in range(c.layers_per_block + 1):
        x = ResBlock(out, g, eps, "conv_shortcut", d, pd, name=f"up_{i}_res_{j}")(x)
      if i < len(ups) - 1:
        x = Upsample(d, pd, name=f"up_{i}_upsample")(x)
    x = nn.silu(group_norm(g, eps, "conv_norm_out", d, pd)(x))
    return conv(c.out_channels, 3, "conv_out", d, pd)(x)


def init_params(config: VQGANConfig, key: jax.Array) -> Any:
  """Random params (for tests and benchmarks; real weights come from ``vq.convert``)."""
  return VQGANDecoder(config).init(key, jnp.zeros((1, 1, 1), jnp.int32))["params"]


def abstract_params(config: VQGANConfig) -> Any:
  """``ShapeDtypeStruct`` pytree of the params, without allocating them."""
  return jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))


def decode_float(params: Any, codes: jax.Array, config: VQGANConfig = PRESETS["dimoo"]) -> jax.Array:
  """codes ``[B, h, w] int32`` -> pixels ``[B, h*s, w*s, 3] float32`` in [0, 1] (reference ``.clip(0, 1)``)."""
  out = VQGANDecoder(config).apply({"params": params}, codes)
  return jnp.clip(out.astype(jnp.float32), 0.0, 1.0)


def to_uint8(pixels: jax.Array) -> jax.Array:
  """[0, 1] float -> uint8 by rounding, as diffusers' ``VaeImageProcessor.postprocess`` does."""
  return jnp.round(pixels * 255.0).astype(jnp.uint8)


def decode(params: Any, codes: jax.Array, config: VQGANConfig = PRESETS["dimoo"]) -> jax.Array:
  """codes ``[B, h, w] int32`` -> RGB ``[B, h*s, w*s, 3] uint8``; jittable (config is static)."""
  return to_uint8(decode_float(params, codes, config))


def make_decode(config: VQGANConfig = PRESETS["dimoo"], mesh=None):
  """Jitted ``decode(params, codes)``; with ``mesh`` the batch is split over ``('data', 'fsdp')``
  and params are replicated (the decoder is small next to the policy)."""
  return jit_decode(functools.partial(decode, config=config), mesh)


def jit_decode(fn, mesh=None):
  """``jax.jit(fn)`` for ``fn(params, codes [B, h, w]) -> [B, H, W, 3]``; with ``mesh`` (any axis
  types: its Auto twin is used) params are replicated and codes/images split over the batch axes."""
  if mesh is None:
    return jax.jit(fn)
  from htgrpo_jax import parallel

  mesh = parallel.auto_mesh(mesh)
  return jax.jit(
      fn,
      in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh, 3)),
      out_shardings=parallel.batch_sharding(mesh, 4),
  )


def strip_newlines(tokens: jax.Array, h: int, w: int, config: VQGANConfig = PRESETS["dimoo"]) -> jax.Array:
  """DiMOO image-slot tokens with a newline after each row -> codes.

  Args:
    tokens: ``[B, h * (w + 1)] int`` token ids, rows of ``w`` image ids (``code + code_offset``)
      each followed by ``newline_id``, i.e. ``x[:, code_start:code_start + h*(w+1)]``.
    h, w: code grid size (image ``16h x 16w`` pixels).

  Returns:
    ``[B, h, w] int32`` codes (``token - code_offset``, clipped to the codebook).

  Raises:
    ValueError: the length is not ``h * (w + 1)``; or, for concrete (non-traced) input, a row does
      not end in ``newline_id`` or an image slot holds a non-image id (e.g. a leftover mask).
  """
  b, n = tokens.shape
  if n != h * (w + 1):
    raise ValueError(f"strip_newlines: {n} tokens, expected h*(w+1) = {h}*({w}+1) = {h * (w + 1)}")
  grid = tokens.reshape(b, h, w + 1)
  if not isinstance(tokens, jax.core.Tracer):
    g = np.asarray(grid)
    bad = np.argwhere(g[:, :, w] != config.newline_id)
    if bad.size:
      i, r = (int(v) for v in bad[0])
      raise ValueError(
          f"strip_newlines: row {r} of batch {i} ends in {int(g[i, r, w])}, " f"not newline {config.newline_id}"
      )
    bad = np.argwhere(
        (g[:, :, :w] < config.code_offset) | (g[:, :, :w] >= config.code_offset + config.num_vq_embeddings)
    )
    if bad.size:
      i, r, j = (int(v) for v in bad[0])
      raise ValueError(
          f"strip_newlines: slot (batch {i}, row {r}, col {j}) holds id "
          f"{int(g[i, r, j])}, not an image id in [{config.code_offset}, "
          f"{config.code_offset + config.num_vq_embeddings})"
      )
  codes = grid[:, :, :w].astype(jnp.int32) - config.code_offset
  return jnp.clip(codes, 0, config.num_vq_embeddings - 1)
