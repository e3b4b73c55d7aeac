"""The rollout record: everything HT-GRPO needs from one batch of sampled images.

Shared contract between the samplers (which fill it), the rewards (``rewards``) and the update.

Canvas convention used across the package: an image canvas is ``int32[B, N]`` holding codebook
indices in ``[0, C)`` at committed slots and ``MASK = -1`` at masked slots. The model side
turns (prompt tokens, canvas) into its own token sequence through a ``Layout``.
"""
from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp
from flax import struct

MASK = -1  # masked slot in an image canvas (codes are >= 0)

# The policy as the algorithm sees it: logits of the N image slots over the C codebook entries,
# given the prompt tokens and a (partially) masked canvas.
#   canvas_logits_fn(params, prompt_tokens int32[B, Lp], canvas int32[B, N]) -> float32[B, N, C]
CanvasLogitsFn = Callable[[chex.ArrayTree, jax.Array, jax.Array], jax.Array]


@struct.dataclass
class Rollout:
  """One rollout batch. Leading dim B = prompts x G with each prompt's G images contiguous; with
  ``HTGRPOConfig.num_sketches`` M >= 2 a group is M sketches x G / M paints, each sketch's paints
  contiguous (rows ordered prompt, sketch, paint).

  Attributes:
    prompt_tokens: int32[B, Lp] conditional prompt tokens (the layout's prompt part).
    image_tokens: int32[B, N] sampled codes in [0, C).
    commit_step: int32[B, N] sampler step (0-based, < T) at which each token was fixed.
    commit_entropy: float32[B, N] entropy (nats) of the distribution the token was drawn from.
    commit_logp: float32[B, N] log-prob of the drawn token under that distribution.
    rewards: float32[B] scalar reward per image.
  """
  prompt_tokens: jax.Array
  image_tokens: jax.Array
  commit_step: jax.Array
  commit_entropy: jax.Array
  commit_logp: jax.Array
  rewards: jax.Array

  @property
  def batch_size(self) -> int:
    return self.image_tokens.shape[0]

  @property
  def num_image_tokens(self) -> int:
    return self.image_tokens.shape[1]

  def validate(self) -> None:
    """Host-side shape/dtype checks; raises ValueError naming the field at fault."""
    b, n = self.image_tokens.shape
    expect = {
        "prompt_tokens": (jnp.int32, (b, None)),
        "image_tokens": (jnp.int32, (b, n)),
        "commit_step": (jnp.int32, (b, n)),
        "commit_entropy": (jnp.float32, (b, n)),
        "commit_logp": (jnp.float32, (b, n)),
        "rewards": (jnp.float32, (b,)),
    }
    for name, (dtype, shape) in expect.items():
      x = getattr(self, name)
      if x.dtype != dtype:
        raise ValueError(f"Rollout.{name}: dtype {x.dtype}, expected {jnp.dtype(dtype).name}")
      if len(x.shape) != len(shape) or any(s is not None and s != t for s, t in zip(shape, x.shape)):
        raise ValueError(f"Rollout.{name}: shape {tuple(x.shape)}, expected "
                         f"{tuple('?' if s is None else s for s in shape)}")
