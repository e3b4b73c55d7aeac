"""VQ image decoders of the 8B path: MAGVIT-v2 (MMaDA) and the aMUSEd-style VQ-GAN (Lumina-DiMOO).

``magvit2.decode`` / ``vqgan.decode``: ``(params, codes [B, h, w] int32) -> [B, 16h, 16w, 3] uint8``;
``vq.convert`` reads the HF checkpoints into their params; ``build_decoder`` gives the trainer's
``(params, canvas [B, h*w]) -> pixels`` pair for a layout's code grid.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from htgrpo_jax.models.vq import magvit2, vqgan

__all__ = ["magvit2", "vqgan", "build_decoder", "KINDS"]

# kind -> (module, preset of the released checkpoint, loader name in vq.convert)
KINDS = {"magvit2": (magvit2, "mmada", "load_magvit2_params"),
         "vqgan": (vqgan, "dimoo", "load_vqgan_params")}


def _decode_canvas(params: Any, canvas: jax.Array, *, module, config, grid: tuple[int, int]) -> jax.Array:
  """canvas ``int32[B, h*w]`` codes in [0, C) (row-major, no newline slots) -> ``uint8[B, 16h, 16w, 3]``."""
  h, w = grid
  # Codes are clipped like the references' decode paths do, so a stray mask cannot index out of range.
  codes = jnp.clip(canvas.astype(jnp.int32), 0, config.codebook_size - 1).reshape(-1, h, w)
  return module.decode(params, codes, config)


def build_decoder(kind: str, checkpoint: str, grid: tuple[int, int], *, key: str = "vq_checkpoint",
                  preset: str | None = None, config: Any = None, mesh=None) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
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
    ``(decode, params)``: ``decode(params, canvas int32[B, h*w]) -> uint8[B, s*h, s*w, 3]`` is pure
    and jittable; ``params`` is the loaded pytree.

  Raises:
    ValueError: unknown ``kind`` or ``preset``, a missing path, or a checkpoint whose tensors do not match (the
      message starts with ``key`` and names the tensor).
  """
  if kind not in KINDS:
    raise ValueError(f"model.vq_kind={kind!r} must be one of {tuple(KINDS)}")
  module, default, loader = KINDS[kind]
  if preset and preset not in module.PRESETS:
    raise ValueError(f"model.vq_preset={preset!r} must be one of {tuple(module.PRESETS)} for {kind}")
  if not checkpoint or not os.path.exists(checkpoint):
    raise ValueError(f"{key}: VQ decoder checkpoint {checkpoint!r} does not exist")
  from htgrpo_jax.models.vq import convert
  config = config or module.PRESETS[preset or default]
  try:
    params = getattr(convert, loader)(checkpoint, config, mesh=mesh)
  except ValueError as e:
    raise ValueError(f"{key}={checkpoint!r}: {e}") from None
  fn = functools.partial(_decode_canvas, module=module, config=config,
                         grid=(int(grid[0]), int(grid[1])))
  return fn, params
