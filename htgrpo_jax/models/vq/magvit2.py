"""MAGVIT-v2 decoder (MMaDA's ``showlab/magvitv2`` image tokenizer) in Flax Linen, NHWC.

Decode path (docs/models.md, MAGVIT-v2), codes ``[B, h, w]`` -> pixels ``[B, 16h, 16w, 3]``:

  z = bits(code, 13, MSB first) * 2 - 1                 [B, h, w, 13]   (lookup-free, no params)
  z = post_quant_conv(z)                                1x1, 13 -> 13
  x = conv_in(z)                                        3x3, 13 -> 512
  x = ResBlock(512), AttnBlock(512), ResBlock(512)      mid
  up levels 4..0 (execution order; ch = 128 * (1, 1, 2, 2, 4)[level], resnets (4, 4, 3, 4, 3)[level]):
      resnets (1x1 ``nin_shortcut`` when channels change), then nearest 2x + conv3x3 on levels 4..1
  x = conv_out(silu(GroupNorm(x)))                      3x3, 128 -> 3, range [-1, 1]
  image = uint8(floor(clip((x + 1) / 2, 0, 1) * 255))   (the reference's truncating cast)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from htgrpo_jax.models.vq.vqgan import AttnBlock, ResBlock, Upsample, conv, group_norm, jit_decode


@dataclasses.dataclass(frozen=True)
class Magvit2Config:
  """Sizes of the MAGVIT-v2 ``VQGANDecoder``.

  Attributes:
    ch: base channels; level ``l`` has ``ch * ch_mult[l]`` (level 0 = full resolution).
    ch_mult: per-level multipliers.
    num_res_blocks: resnets per level (decoder's own list, not the encoder's).
    code_bits: LFQ bits = latent channels (codebook ``2**code_bits``).
    norm_groups / norm_eps: every GroupNorm.
    code_offset: MMaDA token id of code 0.
    dtype / param_dtype: compute and storage dtypes.
  """

  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: tuple[int, ...] = (4, 4, 3, 4, 3)
  code_bits: int = 13
  norm_groups: int = 32
  norm_eps: float = 1e-6
  out_channels: int = 3
  code_offset: int = 126349
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, "num_res_blocks", tuple(int(n) for n in self.num_res_blocks))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    if len(self.ch_mult) != len(self.num_res_blocks):
      raise ValueError(
          f"Magvit2Config: ch_mult {self.ch_mult} and num_res_blocks " f"{self.num_res_blocks} differ in length"
      )
    for m in self.ch_mult:
      if (self.ch * m) % self.norm_groups:
        raise ValueError(f"Magvit2Config: channels {self.ch * m} not divisible by norm_groups={self.norm_groups}")

  @property
  def codebook_size(self) -> int:
    return 2**self.code_bits

  @property
  def scale(self) -> int:
    """Pixels per code along each axis."""
    return 2 ** (len(self.ch_mult) - 1)


PRESETS: dict[str, Magvit2Config] = {
    # MMaDA-8B's tokenizer: ~40M decoder params, 512x512 <-> 32x32 codes.
    "mmada": Magvit2Config(),
    # Unit tests: 3 levels (4x), one channel change, the same 13-bit codes.
    "tiny": Magvit2Config(ch=16, ch_mult=(1, 1, 2), num_res_blocks=(2, 1, 2), norm_groups=8),
}


def lfq_embed(codes: jax.Array, bits: int) -> jax.Array:
  """LFQ code -> ``{-1, +1}^bits``, most significant bit first (reference ``quantize.embedding``).

  ``[...] int32 -> [..., bits] float32``.
  """
  shifts = jnp.arange(bits - 1, -1, -1, dtype=jnp.int32)
  return ((codes[..., None] >> shifts) & 1).astype(jnp.float32) * 2.0 - 1.0


class Magvit2Decoder(nn.Module):
  """codes ``[B, h, w] int32`` -> raw decoder output ``[B, h*s, w*s, 3]`` in about [-1, 1].

  Params: ``post_quant_conv``, ``conv_in``, ``mid_block_1``, ``mid_attn_1``, ``mid_block_2``,
  ``up_{l}_block_{j}``, ``up_{l}_upsample`` (l > 0), ``norm_out``, ``conv_out``.
  Codes are clipped to ``[0, 2**bits)`` as MMaDA clamps sampled ids before decoding.
  """

  config: Magvit2Config

  @nn.compact
  def __call__(self, codes):
    c = self.config
    d, pd, g, eps = c.dtype, c.param_dtype, c.norm_groups, c.norm_eps
    z = lfq_embed(jnp.clip(codes, 0, c.codebook_size - 1), c.code_bits).astype(d)
    z = conv(c.code_bits, 1, "post_quant_conv", d, pd)(z)
    x = conv(c.ch * c.ch_mult[-1], 3, "conv_in", d, pd)(z)
    x = ResBlock(x.shape[-1], g, eps, "nin_shortcut", d, pd, name="mid_block_1")(x)
    x = AttnBlock(g, eps, d, pd, name="mid_attn_1")(x)
    x = ResBlock(x.shape[-1], g, eps, "nin_shortcut", d, pd, name="mid_block_2")(x)
    for level in reversed(range(len(c.ch_mult))):
      for j in range(c.num_res_blocks[level]):
        x = ResBlock(c.ch * c.ch_mult[level], g, eps, "nin_shortcut", d, pd, name=f"up_{level}_block_{j}")(x)
      if level:
        x = Upsample(d, pd, name=f"up_{level}_upsample")(x)
    x = nn.silu(group_norm(g, eps, "norm_out", d, pd)(x))
    return conv(c.out_channels, 3, "conv_out", d, pd)(x)


def init_params(config: Magvit2Config, key: jax.Array) -> Any:
  """Random params (for tests and benchmarks; real weights come from ``vq.convert``)."""
  return Magvit2Decoder(config).init(key, jnp.zeros((1, 1, 1), jnp.int32))["params"]


def abstract_params(config: Magvit2Config) -> Any:
  """``ShapeDtypeStruct`` pytree of the params, without allocating them."""
  return jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))


def decode_float(params: Any, codes: jax.Array, config: Magvit2Config = PRESETS["mmada"]) -> jax.Array:
  """codes ``[B, h, w] int32`` -> pixels ``[B, h*s, w*s, 3] float32`` = ``clip((x + 1) / 2, 0, 1)``."""
  out = Magvit2Decoder(config).apply({"params": params}, codes)
  return jnp.clip((out.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def to_uint8(pixels: jax.Array) -> jax.Array:
  """[0, 1] float -> uint8 truncating, as the reference's ``(x * 255).astype(np.uint8)``."""
  return jnp.floor(pixels * 255.0).astype(jnp.uint8)


def decode(params: Any, codes: jax.Array, config: Magvit2Config = PRESETS["mmada"]) -> jax.Array:
  """codes ``[B, h, w] int32`` -> RGB ``[B, h*s, w*s, 3] uint8``; jittable (config is static)."""
  return to_uint8(decode_float(params, codes, config))


def make_decode(config: Magvit2Config = PRESETS["mmada"], mesh=None):
  """Jitted ``decode(params, codes)``; with ``mesh`` the batch is split over ``('data', 'fsdp')``
  and params are replicated."""
  return jit_decode(functools.partial(decode, config=config), mesh)


def tokens_to_codes(tokens: jax.Array, h: int = 32, w: int = 32, config: Magvit2Config = PRESETS["mmada"]) -> jax.Array:
  """MMaDA image-slot ids ``[B, h*w]`` -> codes ``[B, h, w] int32`` (minus the offset, clamped to
  the codebook as ``t2i_generate`` does)."""
  codes = tokens.astype(jnp.int32).reshape(tokens.shape[0], h, w) - config.code_offset
  return jnp.clip(codes, 0, config.codebook_size - 1)
