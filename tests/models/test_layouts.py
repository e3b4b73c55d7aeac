"""Layouts: reference positions of MMaDA / DiMOO sequences, round trips, CFG prompt shapes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from htgrpo_jax.models import layouts
from htgrpo_jax.rl.rollout import MASK


def test_mmada_layout_matches_reference_positions(word_tokenizer_dir):
  lay = layouts.MMaDALayout(word_tokenizer_dir)
  assert (lay.seq_len, lay.prompt_length, lay.num_image_tokens, lay.grid) == (1539, 513, 1024, (32, 32))
  # The reference reads image logits at [:, -(1024 + 1):-1].
  np.testing.assert_array_equal(lay.image_positions, np.arange(1539 - 1025, 1539 - 1))
  prompts = lay.encode_prompts(["a red circle", "two blue square"])
  assert prompts.shape == (2, 513) and prompts.dtype == np.int32
  text = lay.tokenizer("a red circle", add_special_tokens=False)["input_ids"]
  want = [126093] * (513 - len(text) - 3) + [126088, 126080] + text + [126081]
  np.testing.assert_array_equal(prompts[0], want)
  canvas = jnp.full((2, 1024), MASK, jnp.int32).at[:, 5].set(7)
  seq = np.asarray(lay.assemble(jnp.asarray(prompts), canvas))
  assert seq.shape == (2, 1539)
  assert seq[0, 513] == 126084 and seq[0, 1538] == 126085  # <|soi|>, <|eoi|>
  assert seq[0, 514] == 126336 and seq[0, 514 + 5] == 7 + 126349
  uncond = lay.unconditional_prompts(3)
  assert uncond.shape == (3, 513)
  np.testing.assert_array_equal(uncond[0, -3:], [126088, 126080, 126081])
  assert np.all(uncond[0, :-3] == 126093)


def test_mmada_truncates_like_reference(word_tokenizer_dir):
  lay = layouts.MMaDALayout(word_tokenizer_dir, max_text_len=6, grid=(2, 2))
  p = lay.encode_prompts(["a red blue green circle square"])[0]
  ids = lay.tokenizer("a red blue", add_special_tokens=False)["input_ids"]
  np.testing.assert_array_equal(p, [126088, 126080] + ids + [126081])
  assert lay.seq_len == 6 + 1 + 4 + 1


def test_dimoo_512_has_32_rows_ending_in_newline(word_tokenizer_dir):
  lay = layouts.DiMOOLayout(word_tokenizer_dir, height=512, width=512, prompt_length=40)
  assert lay.num_image_tokens == 1024 and lay.grid == (32, 32)
  assert lay.seq_len == 40 + 2 + 32 * 33 + 2
  prompts = lay.encode_prompts(["a red circle"])
  canvas = jnp.asarray(np.random.default_rng(0).integers(0, 8192, (1, 1024)), jnp.int32)
  seq = np.asarray(lay.assemble(jnp.asarray(prompts), canvas))[0]
  np.testing.assert_array_equal(seq[40:42], [126354, 126349])  # <answer> <boi>
  rows = seq[42 : 42 + 32 * 33].reshape(32, 33)
  assert np.all(rows[:, 32] == 126084)
  np.testing.assert_array_equal(rows[:, :32].reshape(-1), np.asarray(canvas)[0] + 126356)
  np.testing.assert_array_equal(seq[-2:], [126350, 126355])
  np.testing.assert_array_equal(seq[lay.image_positions], np.asarray(canvas)[0] + 126356)
  # The prompt is the tokenizer's encoding of the system/user template, left-padded.
  ids = lay.tokenizer(layouts.DIMOO_SYSTEM + "<user>a red circle</user>")["input_ids"]
  np.testing.assert_array_equal(prompts[0, -len(ids) :], ids)
  assert np.all(prompts[0, : -len(ids)] == 126081)
  u = lay.unconditional_prompts(2)
  uids = lay.tokenizer(layouts.DIMOO_SYSTEM + "<user><uncondition></user>")["input_ids"]
  assert u.shape == (2, 40)
  np.testing.assert_array_equal(u[1, -len(uids) :], uids)


def test_dimoo_non_square_and_bad_resolution(word_tokenizer_dir):
  lay = layouts.DiMOOLayout(word_tokenizer_dir, height=256, width=512, prompt_length=32)
  assert lay.grid == (16, 32) and lay.num_image_tokens == 512
  with pytest.raises(ValueError, match="width"):
    layouts.DiMOOLayout(word_tokenizer_dir, height=256, width=500)


@given(st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_embedded_round_trip(word_tokenizer_dir, batch, seed):
  lay = layouts.EmbeddedLayout(word_tokenizer_dir, grid=(3, 4), codebook_size=16, prompt_length=6)
  rng = np.random.default_rng(seed)
  canvas = rng.integers(0, 16, (batch, 12))
  canvas = np.where(rng.random((batch, 12)) < 0.4, MASK, canvas).astype(np.int32)
  prompts = lay.encode_prompts(["a red circle"] * batch)
  seq = jax.jit(lay.assemble)(jnp.asarray(prompts), jnp.asarray(canvas))
  assert seq.shape == (batch, lay.seq_len) and seq.dtype == jnp.int32
  np.testing.assert_array_equal(lay.codes_from_tokens(seq), canvas)
  np.testing.assert_array_equal(np.asarray(seq)[:, :6], prompts)
  assert int(jnp.max(seq)) < lay.vocab_size


def test_embedded_ids(word_tokenizer_dir):
  lay = layouts.EmbeddedLayout(word_tokenizer_dir, grid=(2, 2), codebook_size=8, prompt_length=5)
  n = len(lay.tokenizer)
  assert (lay.mask_id, lay.image_offset, lay.vocab_size) == (n, n + 1, n + 9)
  np.testing.assert_array_equal(lay.image_positions, [5, 6, 7, 8])
  p = lay.encode_prompts(["red circle"])[0]
  assert list(p[:3]) == [lay.pad_id] * 3
  assert np.all(lay.unconditional_prompts(1) == lay.pad_id)


def test_errors_name_the_input(word_tokenizer_dir, tmp_path):
  lay = layouts.EmbeddedLayout(word_tokenizer_dir, grid=(2, 2), codebook_size=8, prompt_length=3)
  with pytest.raises(ValueError, match=r"prompts\[1\]"):
    lay.encode_prompts(["red", ""])
  with pytest.raises(ValueError, match="unknown"):
    lay.encode_prompts(["a purple circle"])
  with pytest.raises(ValueError, match="prompt_length"):
    lay.encode_prompts(["a red blue green"])
  with pytest.raises(ValueError, match="non-empty list"):
    lay.encode_prompts([])
  with pytest.raises(ValueError, match="canvas"):
    lay.assemble(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="does not exist"):
    layouts.EmbeddedLayout(str(tmp_path / "nope"))
  with pytest.raises(ValueError, match="no loadable tokenizer"):
    layouts.EmbeddedLayout(str(tmp_path))
