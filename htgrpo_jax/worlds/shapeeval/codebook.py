"""The ShapeEval VQ tokenizer: a k-means codebook of image patches.

An image uint8[H, W, 3] is cut into non-overlapping p x p patches (row-major), each replaced by
the index of its nearest codebook entry: codes int32[B, N] with N = (H/p) * (W/p), the canvas
layout of ``htgrpo_jax.contracts`` (masked slots there are ``MASK = -1``). Decoding pastes the
entries back. In the aligned world (objects snapped to the patch grid) only ~85 distinct patches
occur, so K = 128 reconstructs rendered scenes exactly.

The fit runs Lloyd's k-means in JAX on the *distinct* patches weighted by their counts (exact
same objective as on all patches, orders of magnitude fewer points), after a k-means++ init.
"""

from __future__ import annotations

import io
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from htgrpo_jax import paths
from htgrpo_jax.contracts import MASK

MASK_GRAY = 128  # decoded value of masked slots, so partial canvases can be looked at


def patch_size(codebook: jax.Array | np.ndarray) -> int:
  """Patch side p from a codebook float32[K, p*p*3]."""
  d = codebook.shape[-1]
  p = math.isqrt(d // 3)
  if codebook.ndim != 2 or p * p * 3 != d:
    raise ValueError(f"codebook shape {codebook.shape} is not [K, p*p*3]")
  return p


def patchify(images: jax.Array, p: int) -> jax.Array:
  """uint8[B, H, W, 3] -> float32[B, N, p*p*3], patches row-major."""
  b, h, w, c = images.shape
  if h % p or w % p:
    raise ValueError(f"images {h}x{w} are not divisible by patch {p}")
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c).astype(jnp.float32)


def unpatchify(patches: jax.Array, p: int) -> jax.Array:
  """[B, N, p*p*3] -> [B, H, W, 3] for a square grid (N must be a perfect square)."""
  b, n, _ = patches.shape
  g = math.isqrt(n)
  if g * g != n:
    raise ValueError(f"{n} tokens do not form a square grid")
  x = patches.reshape(b, g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * p, g * p, 3)


def _sq_dists(x: jax.Array, c: jax.Array) -> jax.Array:
  """float32[M, K] squared distances between rows of x [M, D] and c [K, D]."""
  return jnp.sum(x * x, -1)[:, None] - 2.0 * x @ c.T + jnp.sum(c * c, -1)[None, :]


@jax.jit
def _kmeanspp(points: jax.Array, weights: jax.Array, key: jax.Array, init: jax.Array) -> jax.Array:
  """k-means++ seeding over weighted points; ``init`` float32[K, D] only gives the shape."""
  k = init.shape[0]

  def body(i, carry):
    cents, d2, key = carry
    key, sub = jax.random.split(key)
    p = weights * d2
    # Once every distinct point is a centre, p is all zero: any pick (a duplicate) is fine.
    logits = jnp.where(p > 0, jnp.log(jnp.maximum(p, 1e-30)), -jnp.inf)
    logits = jnp.where(jnp.any(p > 0), logits, jnp.log(weights))
    j = jax.random.categorical(sub, logits)
    cents = cents.at[i].set(points[j])
    d2 = jnp.minimum(d2, jnp.sum((points - points[j]) ** 2, -1))
    return cents, d2, key

  key, sub = jax.random.split(key)
  j0 = jax.random.categorical(sub, jnp.log(weights))
  cents = init.at[0].set(points[j0])
  d2 = jnp.sum((points - points[j0]) ** 2, -1)
  cents, _, _ = jax.lax.fori_loop(1, k, body, (cents, d2, key))
  return cents


@jax.jit
def _lloyd_step(points: jax.Array, weights: jax.Array, cents: jax.Array) -> jax.Array:
  assign = jnp.argmin(_sq_dists(points, cents), -1)
  onehot = jax.nn.one_hot(assign, cents.shape[0], dtype=jnp.float32) * weights[:, None]
  mass = onehot.sum(0)
  new = (onehot.T @ points) / jnp.maximum(mass, 1e-9)[:, None]
  return jnp.where(mass[:, None] > 0, new, cents)  # empty clusters keep their centre


def fit_codebook(
    images: np.ndarray, num_codes: int = 128, key: jax.Array | None = None, patch: int = 4, iters: int = 25
) -> jax.Array:
  """Learns a patch codebook with weighted k-means (k-means++ init, Lloyd steps).

  Args:
    images: uint8[B, H, W, 3] training images.
    num_codes: K, the codebook size.
    key: PRNG key for the seeding (default PRNGKey(0)).
    patch: patch side p.
    iters: Lloyd iterations.

  Returns:
    float32[K, p*p*3] codebook (pixel values in [0, 255]).
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8[B, H, W, 3], got {images.dtype}{list(images.shape)}")
  if num_codes < 1:
    raise ValueError(f"num_codes={num_codes} must be >= 1")
  key = jax.random.PRNGKey(0) if key is None else key
  flat = np.asarray(patchify(jnp.asarray(images), patch)).reshape(-1, patch * patch * 3)
  flat = np.ascontiguousarray(flat.astype(np.uint8))
  # Distinct rows via a bytes view: 1-D unique is ~50x faster than np.unique(axis=0).
  rows = flat.view(np.dtype((np.void, flat.shape[1]))).ravel()
  uniq, counts = np.unique(rows, return_counts=True)
  points = uniq.view(np.uint8).reshape(-1, flat.shape[1])
  points = jnp.asarray(points, jnp.float32)
  weights = jnp.asarray(counts, jnp.float32)
  init = jnp.zeros((num_codes, points.shape[1]), jnp.float32)
  cents = _kmeanspp(points, weights, key, init)
  for _ in range(iters):
    cents = _lloyd_step(points, weights, cents)
  return cents


@jax.jit
def encode(codebook: jax.Array, images: jax.Array) -> jax.Array:
  """Nearest-entry codes.

  Args:
    codebook: float32[K, p*p*3].
    images: uint8[B, H, W, 3].

  Returns:
    int32[B, N] codes in [0, K), patches row-major, N = (H/p) * (W/p).
  """
  p = patch_size(codebook)
  x = patchify(images, p)
  b, n, d = x.shape
  return jnp.argmin(_sq_dists(x.reshape(b * n, d), codebook), -1).reshape(b, n).astype(jnp.int32)


@jax.jit
def decode(codebook: jax.Array, codes: jax.Array) -> jax.Array:
  """Pastes codebook entries back.

  Args:
    codebook: float32[K, p*p*3].
    codes: int32[B, N] in [0, K), or ``MASK`` (-1) for a masked slot, decoded as mid-gray.
      N must be a perfect square.

  Returns:
    uint8[B, H, W, 3].
  """
  p = patch_size(codebook)
  masked = codes == MASK
  x = codebook[jnp.clip(codes, 0, codebook.shape[0] - 1)]
  x = jnp.where(masked[..., None], float(MASK_GRAY), x)
  return jnp.clip(jnp.round(unpatchify(x, p)), 0, 255).astype(jnp.uint8)


def save(path: str | os.PathLike, codebook: jax.Array) -> None:
  """Writes the codebook to an .npz file (a local path or a URL)."""
  arrays = dict(codebook=np.asarray(codebook, np.float32), patch=patch_size(codebook))
  if paths.is_url(path):
    with paths.open(path, "wb") as f:
      np.savez(f, **arrays)
  else:
    np.savez(path, **arrays)


def load(path: str | os.PathLike) -> jax.Array:
  """Reads a codebook written by ``save`` (a local path or a URL); float32[K, p*p*3]."""
  if paths.is_url(path):
    with paths.open(path, "rb") as f:
      path = io.BytesIO(f.read())
  with np.load(path) as z:
    if "codebook" not in z:
      raise ValueError(f"{path}: no 'codebook' array")
    cb = jnp.asarray(z["codebook"], jnp.float32)
  patch_size(cb)
  return cb
