"""The masked-diffusion objective's pieces (MaskGIT / LLaDA), shared by pretraining (``pretrain.py``)
and the RL update's supervised term (``rl.supervised``): random masks of image-token canvases and the
cross-entropy of the true codes at the masked slots, as an unreduced sum and a count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from htgrpo_jax.contracts import MASK


def mask_random_slots(codes: jax.Array, key: jax.Array, num: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Masks ``num`` (int/float[B, 1] or scalar) slots per row, chosen uniformly at random by ``key``;
  returns (canvas int32[B, N], masked bool[B, N])."""
  b, n = codes.shape
  # Rank of each slot in a random order: the ``num`` lowest-ranked slots are masked.
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(key, (b, n)), axis=1), axis=1)
  masked = rank < num
  return jnp.where(masked, MASK, codes), masked


def mask_canvas(codes: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Masks ceil(t * N) random slots per row, t ~ U(0, 1] per row.

  Args:
    codes: int32[B, N] clean codes.
    key: PRNG key.

  Returns:
    (canvas int32[B, N] with MASK at masked slots, masked bool[B, N]); every row masks >= 1 slot.
  """
  b, n = codes.shape
  k_t, k_order = jax.random.split(key)
  t = 1.0 - jax.random.uniform(k_t, (b, 1))  # (0, 1]
  return mask_random_slots(codes, k_order, jnp.clip(jnp.ceil(t * n), 1, n))


def masked_token_nll(logits: jax.Array, codes: jax.Array, masked: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy of the true codes at the masked slots.

  Args:
    logits: float[B, N, C]; codes: int32[B, N]; masked: bool[B, N].

  Returns:
    (summed loss float32[], number of masked slots float32[]).
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), codes)
  w = masked.astype(jnp.float32)
  return jnp.sum(ce * w), jnp.sum(w)
