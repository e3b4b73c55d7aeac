"""Fixtures for model tests: tiny local tokenizers written with the `tokenizers` library."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.helpers import local_server

WORDS = (
    "a red blue green circle square triangle above below left of right two three "
    "Generate an image according to the text prompt ."
).split()
# DiMOO's prompt template uses these literal strings; the real tokenizer has them as tokens.
DIMOO_SPECIALS = ["<system>", "</system>", "<user>", "</user>", "<uncondition>"]


def write_word_tokenizer(path, specials=()):
  """Saves a WordLevel tokenizer ([PAD]=0, [UNK]=1, WORDS, specials) to ``path``; returns it."""
  vocab = {"[PAD]": 0, "[UNK]": 1}
  for w in list(WORDS) + list(specials):
    vocab.setdefault(w, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", additional_special_tokens=list(specials) or None
  )
  fast.save_pretrained(str(path))
  return fast


@pytest.fixture(scope="session")
def word_tokenizer_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("word_tok")
  write_word_tokenizer(path, DIMOO_SPECIALS)
  return str(path)


@pytest.fixture(scope="module")
def server():
  """A reward server on 127.0.0.1 scoring images by brightness (``local_server.BrightnessReward``)."""
  with local_server.serve(local_server.BrightnessReward, requests=[]) as srv:
    yield srv
