"""Word-level text tokenizer for the ShapeEval grammar (a Hugging Face fast tokenizer).

Built with the ``tokenizers`` library (WordLevel model, whitespace pre-tokenizer), wrapped in
``transformers.PreTrainedTokenizerFast`` so it is saved with ``save_pretrained(dir)`` and loaded
anywhere with ``AutoTokenizer.from_pretrained(dir)``. Ids: [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3,
[MASK]=4, then the grammar's words in sorted order.

``encode_prompts`` refuses words outside the vocabulary (ValueError naming them) instead of
silently mapping them to [UNK]; the empty string is allowed only as the unconditional prompt.
"""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

import numpy as np
import tokenizers
import transformers
from tokenizers import models, pre_tokenizers, processors

from htgrpo_jax import paths
from htgrpo_jax.worlds.shapeeval import grammar
from htgrpo_jax.worlds.shapeeval.scenes import WorldConfig

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]")


def build_tokenizer(words: Sequence[str] | None = None) -> transformers.PreTrainedTokenizerFast:
  """A word-level tokenizer over ``words`` (default: the grammar's vocabulary)."""
  words = list(grammar.vocabulary(WorldConfig()) if words is None else words)
  bad = [w for w in words if not w or any(c.isspace() for c in w) or w in SPECIALS]
  if bad or len(set(words)) != len(words):
    raise ValueError(
        f"build_tokenizer: words must be unique, non-empty, without spaces and not "
        f"special tokens; offending: {bad or 'duplicates'}"
    )
  vocab = {t: i for i, t in enumerate(list(SPECIALS) + words)}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(
      single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
  )
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok,
      pad_token="[PAD]",
      unk_token="[UNK]",
      bos_token="[BOS]",
      eos_token="[EOS]",
      mask_token="[MASK]",
      padding_side="right",
  )


def save_tokenizer(tokenizer: transformers.PreTrainedTokenizerFast, path: str | os.PathLike) -> None:
  """``save_pretrained`` into a folder; a URL gets the files written locally, then copied up."""
  path = os.fspath(path)
  if not paths.is_url(path):
    tokenizer.save_pretrained(path)
    return
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save_pretrained(tmp)
    paths.makedirs(path)
    for name in sorted(os.listdir(tmp)):
      with open(os.path.join(tmp, name), "rb") as src, paths.open(paths.join(path, name), "wb") as dst:
        dst.write(src.read())


def load_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
  """Loads a saved tokenizer through ``AutoTokenizer`` (a URL from a local copy)."""
  return transformers.AutoTokenizer.from_pretrained(paths.local_copy(os.fspath(path)))


def encode_prompts(
    tokenizer: transformers.PreTrainedTokenizerBase, texts: Sequence[str], max_len: int = 16, allow_empty: bool = False
) -> np.ndarray:
  """Token ids padded to ``max_len``.

  Args:
    tokenizer: from ``build_tokenizer`` / ``load_tokenizer``.
    texts: B prompts.
    max_len: L; longer prompts raise.
    allow_empty: let "" through (encoded as [BOS] [EOS]; the unconditional prompt).

  Returns:
    int32[B, L]: [BOS] words [EOS] [PAD]...

  Raises:
    ValueError naming the prompt and its unknown words, an empty prompt, or an over-long one.
  """
  if isinstance(texts, str):
    raise ValueError("encode_prompts: texts must be a list of strings, got a bare string")
  unk = tokenizer.unk_token_id
  out = np.full((len(texts), max_len), tokenizer.pad_token_id, np.int32)
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise ValueError(f"encode_prompts: prompt {i} is {type(t).__name__}, not str")
    if not t.strip() and not allow_empty:
      raise ValueError(f"encode_prompts: prompt {i} is empty")
    ids = tokenizer(t)["input_ids"]
    if unk in ids:
      words = t.split()
      bad = [w for w in words if tokenizer.convert_tokens_to_ids(w) == unk]
      raise ValueError(f"encode_prompts: prompt {i} {t!r} has unknown word(s) {bad}")
    if len(ids) > max_len:
      raise ValueError(f"encode_prompts: prompt {i} {t!r} has {len(ids)} tokens > max_len={max_len}")
    out[i, : len(ids)] = ids
  return out
