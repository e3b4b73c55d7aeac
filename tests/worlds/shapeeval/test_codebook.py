"""The ShapeEval VQ tokenizer: k-means codebook, encode/decode, save/load."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htgrpo_jax.contracts import MASK
from htgrpo_jax.worlds.shapeeval import codebook as patch_vq
from htgrpo_jax.worlds.shapeeval import scenes as W


def _scenes(n, seed, cfg=W.WorldConfig()):
  rng = np.random.default_rng(seed)
  return W.render_batch([W.sample_scene(rng, [(None, None)] * int(rng.integers(1, 5)), cfg) for _ in range(n)], cfg)


@pytest.fixture(scope="module")
def codebook():
  return patch_vq.fit_codebook(_scenes(400, 0), 128, jax.random.PRNGKey(0))


def test_aligned_world_round_trips_exactly_on_fresh_scenes(codebook):
  assert codebook.shape == (128, 48) and codebook.dtype == jnp.float32
  imgs = _scenes(300, 1)  # scenes the codebook never saw
  codes = patch_vq.encode(codebook, imgs)
  assert codes.shape == (300, 64) and codes.dtype == jnp.int32
  assert int(codes.min()) >= 0 and int(codes.max()) < 128
  np.testing.assert_array_equal(np.asarray(patch_vq.decode(codebook, codes)), imgs)


def test_patch_order_is_row_major(codebook):
  img = np.zeros((1, 32, 32, 3), np.uint8) + np.array(W.BACKGROUND, np.uint8)
  img[0, 4:8, 8:12] = W.COLORS["red"]  # token row 1, column 2 -> index 1 * 8 + 2
  codes = np.asarray(patch_vq.encode(codebook, img))[0]
  assert (codes != codes[0]).sum() == 1 and codes[10] != codes[0]


def test_mask_slots_decode_gray(codebook):
  codes = patch_vq.encode(codebook, _scenes(2, 2)).at[:, :8].set(MASK)
  out = np.asarray(patch_vq.decode(codebook, codes))
  assert (out[:, :4] == patch_vq.MASK_GRAY).all() and (out[:, 4:] != patch_vq.MASK_GRAY).any()


def test_kmeans_finds_separated_clusters():
  # Four flat colours with noise: k=4 must put one centre on each (within the noise level).
  rng = np.random.default_rng(0)
  base = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.float32)
  lab = rng.integers(4, size=(64, 8, 8))
  imgs = np.clip(base[lab] + rng.normal(0, 3, (64, 8, 8, 3)), 0, 255).astype(np.uint8)
  imgs = np.repeat(np.repeat(imgs, 2, 1), 2, 2)  # 2x2 flat patches
  cb = np.asarray(patch_vq.fit_codebook(imgs, 4, jax.random.PRNGKey(1), patch=2)).reshape(4, 4, 3)
  centres = cb.mean(1)
  d = np.linalg.norm(centres[:, None] - base[None], axis=-1)
  assert sorted(d.argmin(1).tolist()) == [0, 1, 2, 3] and d.min(1).max() < 5


def test_unaligned_world_is_lossy_but_close():
  cfg = W.unaligned_config(48)
  cb = patch_vq.fit_codebook(_scenes(150, 3, cfg), 128, jax.random.PRNGKey(0))
  imgs = _scenes(20, 4, cfg)
  rec = np.asarray(patch_vq.decode(cb, patch_vq.encode(cb, imgs))).astype(np.float32)
  err = np.abs(rec - imgs).mean()
  assert 0 < err < 20


def test_save_load_and_jit(codebook, tmp_path):
  patch_vq.save(tmp_path / "cb.npz", codebook)
  cb = patch_vq.load(tmp_path / "cb.npz")
  np.testing.assert_array_equal(np.asarray(cb), np.asarray(codebook))
  imgs = _scenes(4, 5)
  f = jax.jit(lambda c, x: patch_vq.decode(c, patch_vq.encode(c, x)))
  np.testing.assert_array_equal(np.asarray(f(cb, imgs)), imgs)


def test_bad_inputs():
  with pytest.raises(ValueError, match="uint8"):
    patch_vq.fit_codebook(np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="codebook"):
    patch_vq.patch_size(np.zeros((4, 10)))
  with pytest.raises(ValueError, match="divisible"):
    patch_vq.encode(jnp.zeros((4, 48)), np.zeros((1, 30, 30, 3), np.uint8))
