"""The supervised term of an RL update (``HTGRPOConfig.ptx_coef``): masked-token likelihood on
ground-truth (prompt, image tokens) pairs, mixed into every inner iteration's gradient.

InstructGPT's PPO-ptx mixes the pretraining objective into the policy-gradient update so that RL
on one prompt distribution does not erase what pretraining taught elsewhere. Here the objective is
the masked-diffusion loss the base was pretrained with (MaskGIT / LLaDA): per example draw
t ~ U(0, 1], mask ceil(t * N) of the N image slots at random and take the cross-entropy of the
true codes at the masked slots. ``pretrain.py`` trains the base with the same masking.

Losses follow the package's convention: an unreduced sum and a count (the caller divides).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from htgrpo_jax.contracts import MASK
from htgrpo_jax.contracts import mask_canvas, mask_random_slots, masked_token_nll  # noqa: F401 (the term's pieces)


class SupervisedBatch(NamedTuple):
  """Ground-truth pairs for the supervised term: ``prompt_tokens`` int32[P, Lp] (the same prompt
  layout as the rollouts') and ``codes`` int32[P, N] (the image tokens, no MASK)."""

  prompt_tokens: jax.Array
  codes: jax.Array

  def validate(self, prompt_len: int | None = None, num_tokens: int | None = None) -> None:
    """Shape / dtype / value checks on the host, naming the field at fault.

    Raises:
      ValueError: a field is not a rank-2 integer array, the two disagree on P, the layout disagrees
        with the rollouts' (``prompt_len`` Lp, ``num_tokens`` N), or a code is negative or MASK.
    """
    shapes = {}
    for name in ("prompt_tokens", "codes"):
      x = getattr(self, name)  # arrays or jax.ShapeDtypeStruct (AOT lowering)
      shape, dtype = tuple(getattr(x, "shape", np.shape(x))), getattr(x, "dtype", np.asarray(x).dtype)
      if len(shape) != 2 or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"SupervisedBatch.{name} must be an int32[P, ...] array, got shape {shape} dtype {dtype}")
      shapes[name] = shape
    (p, lp), (pc, n) = shapes["prompt_tokens"], shapes["codes"]
    if pc != p:
      raise ValueError(f"SupervisedBatch: prompt_tokens has {p} rows but codes has {pc}")
    if prompt_len is not None and lp != prompt_len:
      raise ValueError(f"SupervisedBatch.prompt_tokens has length {lp}; the rollouts' prompts have {prompt_len}")
    if num_tokens is not None and n != num_tokens:
      raise ValueError(f"SupervisedBatch.codes has {n} image tokens; the rollouts have {num_tokens}")
    if isinstance(self.codes, np.ndarray) or getattr(self.codes, "is_fully_addressable", False):
      codes = np.asarray(self.codes)
      if (codes < 0).any() or (codes == MASK).any():
        raise ValueError("SupervisedBatch.codes holds a negative code or MASK: ground truth has every token")
