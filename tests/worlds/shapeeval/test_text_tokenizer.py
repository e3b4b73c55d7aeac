"""The word-level text tokenizer (tokenizers + transformers)."""

import numpy as np
import pytest
import transformers

from htgrpo_jax.worlds.shapeeval import grammar as G
from htgrpo_jax.worlds.shapeeval import text_tokenizer as T


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  T.save_tokenizer(T.build_tokenizer(), d)
  return transformers.AutoTokenizer.from_pretrained(str(d))


def test_every_prompt_encodes_and_decodes_back(tok):
  texts = [p.text for p in G.all_prompts()]
  ids = T.encode_prompts(tok, texts, max_len=16)
  assert ids.dtype == np.int32 and ids.shape == (len(texts), 16)
  assert (ids[:, 0] == tok.bos_token_id).all() and tok.unk_token_id not in ids
  for t, row in zip(texts[::50], ids[::50]):
    assert tok.decode(row, skip_special_tokens=True) == t
  # Word-level: one id per word, distinct words get distinct ids.
  n = len(texts[0].split())
  assert ids[0, n + 1] == tok.eos_token_id and ids[0, n + 2] == tok.pad_token_id


def test_specials_have_fixed_ids(tok):
  assert [tok.convert_tokens_to_ids(s) for s in T.SPECIALS] == list(range(len(T.SPECIALS)))
  assert len(tok) == len(T.SPECIALS) + len(G.vocabulary())


def test_unknown_and_empty_prompts_raise(tok):
  with pytest.raises(ValueError, match="pink"):
    T.encode_prompts(tok, ["a photo of a pink circle"])
  with pytest.raises(ValueError, match="empty"):
    T.encode_prompts(tok, ["  "])
  with pytest.raises(ValueError, match="max_len"):
    T.encode_prompts(tok, ["a photo of a red circle left of a blue square"], max_len=8)
  uncond = T.encode_prompts(tok, [""], allow_empty=True)[0]
  assert uncond[:2].tolist() == [tok.bos_token_id, tok.eos_token_id] and (uncond[2:] == 0).all()


def test_build_rejects_bad_words():
  with pytest.raises(ValueError, match="words"):
    T.build_tokenizer(["a", "a"])
  with pytest.raises(ValueError, match="words"):
    T.build_tokenizer(["red circle"])
