"""VQ image decoders of the 8B path: MAGVIT-v2 (MMaDA) and the aMUSEd-style VQ-GAN (Lumina-DiMOO).

``magvit2.decode`` / ``vqgan.decode``: ``(params, codes [B, h, w] int32) -> [B, 16h, 16w, 3] uint8``;
``vq.convert`` reads the HF checkpoints into their params; ``build_decoder`` gives the trainer's
``(params, canvas [B, h*w]) -> pixels`` pair for a layout's code grid. ``KINDS`` is the registry of
decoder families (``model.vq_kind``): each ``VQKind`` names its module, its released checkpoint's
preset and its loader.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from htgrpo_jax import paths
from htgrpo_jax.contracts import DecodeFn, Registry
from htgrpo_jax.models.vq import magvit2, vqgan

__all__ = ["magvit2", "vqgan", "build_decoder", "KINDS", "VQKind"]


@dataclasses.dataclass(frozen=True)
class VQKind:
  """A VQ decoder family.

  Attributes:
    module: its decoder module (``PRESETS`` and ``decode(params, codes, config)``).
    default_preset: the preset of the released checkpoint.
    load: ``(checkpoint, config, *, mesh) -> params`` (``vq.convert``'s loader, imported when called:
      the converters need the checkpoint readers, decoding does not).
  """

  module: Any
  default_preset: str
  load: Callable[..., Any]


def _load_magvit2(checkpoint, config, *, mesh=None):
  from htgrpo_jax.models.vq import convert

  return convert.load_magvit2_params(checkpoint, config, mesh=mesh)


def _load_vqgan(checkpoint, config, *, mesh=None):
  from htgrpo_jax.models.vq import convert

  return convert.load_vqgan_params(checkpoint, config, mesh=mesh)


# ``model.vq_kind`` -> its decoder family.
KINDS: Registry[VQKind] = Registry("model.vq_kind")
KINDS.register("magvit2")(VQKind(magvit2, "mmada", _load_magvit2))  # MMaDA
KINDS.register("vqgan")(VQKind(vqgan, "dimoo", _load_vqgan))  # Lumina-DiMOO


def _decode_canvas(params: Any, canvas: jax.Array, *, module, config, grid: tuple[int, int]) -> jax.Array:
  """canvas ``int32[B, h*w]`` codes in [0, C) (row-major, no newline slots) -> ``uint8[B, 16h, 16w, 3]``."""
  h, w = grid
  # Codes are clipped like the references' decode paths do, so a stray mask cannot index out of range.
  codes = jnp.clip(canvas.astype(jnp.int32), 0, config.codebook_size - 1).reshape(-1, h, w)
  return module.decode(params, codes, config)


def build_decoder(
    kind: str,
    checkpoint: str,
    grid: tuple[int, int],
    *,
    key: str = "vq_checkpoint",
    preset: str | None = None,
    config: Any = None,
    mesh=None,
) -> tuple[DecodeFn, Any]:
  """Loads a VQ decoder checkpoint for a layout's code grid.

  Args:
    kind: ``'magvit2'`` (MMaDA) or ``'vqgan'`` (Lumina-DiMOO).
    checkpoint: safetensors/``.bin`` file or folder of the decoder weights.
    grid: ``(h, w)`` codes per image (``layout.grid``); images are ``scale*h x scale*w`` pixels
      (scale 16 for both released decoders).
    key: the config key named in errors.
    preset: a name in the module's ``PRESETS`` ('tiny' for tests); default: the released checkpoint's.
    config: a ``Magvit2Config`` / ``VQGANConfig`` (wins over ``preset``).
    mesh: replicate the params over it (else they land on the default device).

  Returns:
    ``(decode, params)``: ``decode(params, canvas int32[B, h*w]) -> uint8[B, s*h, s*w, 3]`` (a
    ``contracts.DecodeFn``) is pure and jittable; ``params`` is the loaded pytree.

  Raises:
    ValueError: unknown ``kind`` or ``preset``, a missing path, or a checkpoint whose tensors do not match (the
      message starts with ``key`` and names the tensor).
  """
  family = KINDS.get(kind)
  module, default = family.module, family.default_preset
  if preset and preset not in module.PRESETS:
    raise ValueError(f"model.vq_preset={preset!r} must be one of {tuple(module.PRESETS)} for {kind}")
  if not checkpoint or not paths.exists(checkpoint):
    raise ValueError(f"{key}: VQ decoder checkpoint {checkpoint!r} does not exist")
  config = config or module.PRESETS[preset or default]
  try:
    # The readers need local files: a URL checkpoint is copied to a local cache first.
    params = family.load(paths.local_copy(checkpoint), config, mesh=mesh)
  except ValueError as e:
    raise ValueError(f"{key}={checkpoint!r}: {e}") from None
  fn = functools.partial(_decode_canvas, module=module, config=config, grid=(int(grid[0]), int(grid[1])))
  return fn, params
