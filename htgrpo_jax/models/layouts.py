"""Text-to-image sequence layouts: where the prompt and the N image slots sit in the L tokens.

A layout turns (prompt tokens int32[B, Lp], canvas int32[B, N]) into the model's token sequence
int32[B, L] and back. The canvas holds codes in [0, C) or ``MASK = -1`` (rl/rollout.py); in the
sequence a code c becomes ``c + image_offset`` and MASK becomes ``mask_id``. Conditional and
unconditional (CFG) prompts always have the same length Lp, so CFG is one batched forward of 2B rows.

Layouts (docs/models.md, token layouts):
- ``MMaDALayout``: ``[iPAD]* <|t2i|> <bos> text <eos> | <|soi|> | N slots | <|eoi|>``, the prompt
  left-padded to ``max_text_len`` (513) -> L = 1539 for 1024 slots; pads are masked in attention.
- ``DiMOOLayout``: ``system/user prompt | <answer> <boi> | rows of (W/16 slots, newline) | <eoi> </answer>``.
  Deviation: the reference runs unpadded B=1 sequences; we left-pad the prompt to ``prompt_length``
  with ``pad_id`` (<|endoftext|>) and the model masks those keys. With RoPE (relative positions)
  and masked pad keys the non-pad outputs equal the unpadded forward's, so the deviation costs
  compute only (tests/models/test_llada.py checks the equivalence).
- ``EmbeddedLayout``: the ShapeEval world: ``pad* prompt | N slots`` with vocab = text vocab + mask
  + C codes; the unconditional prompt is all pads.

``LAYOUTS`` maps ``model.layout`` ('mmada', 'dimoo') to a builder ``(tokenizer_dir, model_config)
-> Layout`` (``model_config``: the run config's ``model`` section; used by ``tasks.build_layout``);
a new model family registers its builder next to its class.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from htgrpo_jax import paths
from htgrpo_jax.contracts import MASK, Registry


def load_tokenizer(tokenizer: str | os.PathLike | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
  """A transformers tokenizer from a directory (never the hub), or passed through. A URL
  (``gs://...``) is copied to a local cache first (``paths.local_copy``): transformers reads
  local files only.

  Raises:
    ValueError: the directory does not exist or holds no loadable tokenizer.
  """
  if isinstance(tokenizer, PreTrainedTokenizerBase):
    return tokenizer
  path = os.fspath(tokenizer)
  if not paths.isdir(path):
    raise ValueError(f"tokenizer directory {path!r} does not exist")
  try:
    return AutoTokenizer.from_pretrained(paths.local_copy(path), local_files_only=True)
  except Exception as e:  # transformers raises several types; surface one clear error
    raise ValueError(f"tokenizer directory {path!r} holds no loadable tokenizer: {e}") from e


class Layout:
  """Base class: subclasses set the attributes below and implement ``_prompt_ids``.

  Attributes:
    num_image_tokens: N image slots.
    grid: (h, w) with h * w = N (row-major slots).
    codebook_size: C.
    mask_id: token id of a masked slot.
    image_offset: token id of code 0.
    prompt_length: Lp, length of the prompt part (sequence positions [0, Lp)).
    seq_len: L.
    image_positions: np.int32[N] indices of the slots in [0, L), row-major.
    pad_id: prompt pad id (masked in attention) or None.
    vocab_size: the smallest embedding size the layout needs.
  """

  num_image_tokens: int
  grid: tuple[int, int]
  codebook_size: int
  mask_id: int
  image_offset: int
  prompt_length: int
  seq_len: int
  image_positions: np.ndarray
  pad_id: int | None
  vocab_size: int
  tokenizer: PreTrainedTokenizerBase
  _template: np.ndarray  # int32[L]: the sequence with an empty prompt and all slots masked

  # -- prompts -----------------------------------------------------------------------------------
  def _prompt_ids(self, text: str, index: int) -> list[int]:
    """The unpadded prompt ids of one (already validated) prompt."""
    raise NotImplementedError

  def _uncond_ids(self) -> list[int]:
    raise NotImplementedError

  def _pad(self, ids: list[int], what: str) -> list[int]:
    if len(ids) > self.prompt_length:
      raise ValueError(f"{what}: {len(ids)} tokens exceed prompt_length={self.prompt_length}")
    # Left padding keeps the prompt adjacent to the image part, as in MMaDA.
    return [self.pad_id] * (self.prompt_length - len(ids)) + ids

  def _text_ids(self, text: str, index: int) -> list[int]:
    ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
    unk = self.tokenizer.unk_token_id
    if unk is not None and unk in ids:
      raise ValueError(f"prompts[{index}] {text!r} contains words unknown to the tokenizer")
    return ids

  def encode_prompts(self, prompts: Sequence[str]) -> np.ndarray:
    """Tokenises and pads prompts.

    Args:
      prompts: B non-empty strings.

    Returns:
      np.int32[B, Lp] prompt tokens.

    Raises:
      ValueError: no prompts, a non-string or empty prompt, unknown words, or a prompt too long.
    """
    if isinstance(prompts, str) or not len(prompts):
      raise ValueError("prompts must be a non-empty list of strings")
    rows = []
    for i, text in enumerate(prompts):
      if not isinstance(text, str) or not text.strip():
        raise ValueError(f"prompts[{i}] must be a non-empty string, got {text!r}")
      rows.append(self._pad(self._prompt_ids(text, i), f"prompts[{i}]"))
    return np.asarray(rows, np.int32)

  def unconditional_prompts(self, batch: int) -> np.ndarray:
    """np.int32[batch, Lp]: the CFG branch's prompt, same length as conditional prompts."""
    if batch <= 0:
      raise ValueError(f"unconditional_prompts batch must be positive, got {batch}")
    row = self._pad(self._uncond_ids(), "unconditional prompt")
    return np.tile(np.asarray(row, np.int32)[None], (batch, 1))

  # -- sequences ---------------------------------------------------------------------------------
  def assemble(self, prompt_tokens: jax.Array, canvas: jax.Array) -> jax.Array:
    """Builds model input (jit-able).

    Args:
      prompt_tokens: int32[B, Lp].
      canvas: int32[B, N], codes in [0, C) or MASK (-1).

    Returns:
      int32[B, L] tokens: prompt, special tokens, slots (mask_id or code + image_offset).

    Raises:
      ValueError: shapes do not match the layout (names the argument).
    """
    if prompt_tokens.ndim != 2 or prompt_tokens.shape[1] != self.prompt_length:
      raise ValueError(f"assemble: prompt_tokens shape {prompt_tokens.shape}, expected [B, {self.prompt_length}]")
    if canvas.ndim != 2 or canvas.shape != (prompt_tokens.shape[0], self.num_image_tokens):
      raise ValueError(
          f"assemble: canvas shape {canvas.shape}, expected " f"[{prompt_tokens.shape[0]}, {self.num_image_tokens}]"
      )
    b = prompt_tokens.shape[0]
    slots = jnp.where(canvas == MASK, self.mask_id, canvas + self.image_offset).astype(jnp.int32)
    seq = jnp.broadcast_to(jnp.asarray(self._template), (b, self.seq_len))
    seq = seq.at[:, : self.prompt_length].set(prompt_tokens.astype(jnp.int32))
    return seq.at[:, self.image_positions].set(slots)

  def codes_from_tokens(self, tokens: jax.Array) -> jax.Array:
    """int32[B, L] sequence -> int32[B, N] canvas (mask_id -> MASK, id -> id - image_offset)."""
    if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
      raise ValueError(f"codes_from_tokens: tokens shape {tokens.shape}, expected [B, {self.seq_len}]")
    slots = tokens[:, self.image_positions]
    return jnp.where(slots == self.mask_id, MASK, slots - self.image_offset).astype(jnp.int32)

  def _finish(self, prefix: Sequence[int], image_part: Sequence[int | None]) -> None:
    """Sets template/positions from the post-prompt part; ``None`` entries are image slots."""
    tail = np.asarray([self.mask_id if t is None else t for t in image_part], np.int32)
    self._template = np.concatenate([np.asarray(prefix, np.int32), tail])
    self.image_positions = (self.prompt_length + np.flatnonzero(np.asarray([t is None for t in image_part]))).astype(
        np.int32
    )
    self.seq_len = int(self._template.shape[0])
    if self.image_positions.shape[0] != self.num_image_tokens:
      raise AssertionError("layout built a wrong number of image slots")
    if self.image_offset + self.codebook_size > self.vocab_size:
      raise ValueError(
          f"image ids [{self.image_offset}, {self.image_offset + self.codebook_size}) "
          f"exceed vocab_size={self.vocab_size}"
      )


class MMaDALayout(Layout):
  """MMaDA's T2I sequence (``t2i_gen_prompt``): left-padded prompt of ``max_text_len`` + image part.

  Special ids default to the reference's reserved LLaDA slots; text ids come from the tokenizer
  (the LLaDA tokenizer for the real model; tests pass a tiny local one).
  """

  def __init__(
      self,
      tokenizer,
      *,
      max_text_len: int = 513,
      grid: tuple[int, int] = (32, 32),
      codebook_size: int = 8192,
      image_offset: int = 126349,
      mask_id: int = 126336,
      vocab_size: int = 134656,
      t2i_id: int = 126088,
      bos_id: int = 126080,
      eos_id: int = 126081,
      soi_id: int = 126084,
      eoi_id: int = 126085,
      pad_id: int = 126093,
  ):
    self.tokenizer = load_tokenizer(tokenizer)
    if len(self.tokenizer) > image_offset:
      raise ValueError(f"tokenizer has {len(self.tokenizer)} ids, more than image_offset={image_offset}")
    if max_text_len < 3:
      raise ValueError(f"max_text_len={max_text_len} must be >= 3 (<|t2i|> <bos> <eos>)")
    self.grid = (int(grid[0]), int(grid[1]))
    self.num_image_tokens = self.grid[0] * self.grid[1]
    self.codebook_size, self.image_offset, self.mask_id = codebook_size, image_offset, mask_id
    self.vocab_size, self.pad_id, self.prompt_length = vocab_size, pad_id, max_text_len
    self.t2i_id, self.bos_id, self.eos_id = t2i_id, bos_id, eos_id
    self.soi_id, self.eoi_id = soi_id, eoi_id
    self._finish([pad_id] * max_text_len, [soi_id] + [None] * self.num_image_tokens + [eoi_id])

  def _wrap(self, ids: list[int]) -> list[int]:
    if not ids or ids[0] != self.bos_id:
      ids = [self.bos_id] + ids  # the reference prepends bos only if missing
    ids = [self.t2i_id] + ids + [self.eos_id]
    if len(ids) > self.prompt_length:  # reference truncation: keep the first Lp-1 ids, re-append eos
      ids = ids[: self.prompt_length - 1] + [self.eos_id]
    return ids

  def _prompt_ids(self, text, index):
    return self._wrap(self._text_ids(text, index))

  def _uncond_ids(self):
    return self._wrap([])


# ``model.layout`` -> ``(tokenizer, model_config) -> Layout``: the real dMLLM families.
LAYOUTS: Registry = Registry("model.layout")


@LAYOUTS.register("mmada")
def mmada_layout(tokenizer, model_config) -> MMaDALayout:
  """MMaDA's 512 x 512 layout (32 x 32 codes); nothing of ``model_config`` is a knob of it."""
  return MMaDALayout(tokenizer)


DIMOO_SYSTEM = "<system>Generate an image according to the text prompt.</system>"


class DiMOOLayout(Layout):
  """Lumina-DiMOO's T2I sequence for an H x W image (multiples of 16): rows end with a newline id.

  The prompt part is the tokenizer's encoding (default special tokens) of
  ``<system>...</system><user>{prompt}</user>``, left-padded with ``pad_id`` to ``prompt_length``.
  """

  def __init__(
      self,
      tokenizer,
      *,
      height: int = 512,
      width: int = 512,
      prompt_length: int = 256,
      codebook_size: int = 8192,
      image_offset: int = 126356,
      mask_id: int = 126336,
      vocab_size: int = 134548,
      newline_id: int = 126084,
      boi_id: int = 126349,
      eoi_id: int = 126350,
      answer_id: int = 126354,
      end_answer_id: int = 126355,
      pad_id: int = 126081,
      downsample: int = 16,
  ):
    self.tokenizer = load_tokenizer(tokenizer)
    if len(self.tokenizer) > image_offset:
      raise ValueError(f"tokenizer has {len(self.tokenizer)} ids, more than image_offset={image_offset}")
    for key, val in (("height", height), ("width", width)):
      if val <= 0 or val % downsample:
        raise ValueError(f"DiMOOLayout {key}={val} must be a positive multiple of {downsample}")
    h, w = height // downsample, width // downsample
    self.grid, self.num_image_tokens = (h, w), h * w
    self.codebook_size, self.image_offset, self.mask_id = codebook_size, image_offset, mask_id
    self.vocab_size, self.pad_id, self.prompt_length = vocab_size, pad_id, prompt_length
    self.newline_id = newline_id
    rows = ([None] * w + [newline_id]) * h
    self._finish([pad_id] * prompt_length, [answer_id, boi_id] + rows + [eoi_id, end_answer_id])

  def _encode(self, text: str) -> list[int]:
    ids = self.tokenizer(f"{DIMOO_SYSTEM}<user>{text}</user>")["input_ids"]
    if self.pad_id in ids:  # pads are masked in attention, so they must not occur in a prompt
      raise ValueError(f"prompt {text!r} tokenises to the pad id {self.pad_id}")
    return ids

  def _prompt_ids(self, text, index):
    self._text_ids(text, index)  # unknown-word check
    return self._encode(text)

  def _uncond_ids(self):
    return self._encode("<uncondition>")


@LAYOUTS.register("dimoo")
def dimoo_layout(tokenizer, model_config) -> DiMOOLayout:
  """Lumina-DiMOO's layout for a square ``model_config.image_size`` image."""
  return DiMOOLayout(tokenizer, height=model_config.image_size, width=model_config.image_size)


class EmbeddedLayout(Layout):
  """The ShapeEval world: ``pad* prompt | h*w slots``; ids: text vocab, then mask, then C codes.

  The tokenizer (any local dir, e.g. a WordLevel tokenizer) must define a pad token.
  """

  def __init__(self, tokenizer, *, grid: tuple[int, int] = (8, 8), codebook_size: int = 128, prompt_length: int = 16):
    self.tokenizer = load_tokenizer(tokenizer)
    if self.tokenizer.pad_token_id is None:
      raise ValueError("EmbeddedLayout tokenizer must define a pad token")
    if codebook_size <= 0 or prompt_length <= 0 or min(grid) <= 0:
      raise ValueError(
          f"EmbeddedLayout sizes must be positive: grid={grid}, "
          f"codebook_size={codebook_size}, prompt_length={prompt_length}"
      )
    self.grid = (int(grid[0]), int(grid[1]))
    self.num_image_tokens = self.grid[0] * self.grid[1]
    text_vocab = len(self.tokenizer)
    self.codebook_size, self.mask_id, self.image_offset = codebook_size, text_vocab, text_vocab + 1
    self.vocab_size = text_vocab + 1 + codebook_size
    self.pad_id, self.prompt_length = int(self.tokenizer.pad_token_id), prompt_length
    self._finish([self.pad_id] * prompt_length, [None] * self.num_image_tokens)

  def _prompt_ids(self, text, index):
    ids = self._text_ids(text, index)
    if self.pad_id in ids:
      raise ValueError(f"prompts[{index}] {text!r} tokenises to the pad id {self.pad_id}")
    return ids

  def _uncond_ids(self):
    return []
