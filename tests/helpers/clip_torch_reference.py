"""PyTorch references for the CLIP/OWL tests: tiny random ``transformers`` and open_clip models,
their checkpoints, a tiny CLIP BPE tokenizer written here (no downloads), and PIL crops done the
way GenEval does them."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from tests.helpers.torch_vq_reference import write_ckpt

# A CLIP BPE vocabulary just big enough for GenEval's colour prompts (and a few objects).
WORDS = (
    "a photo of an the red orange yellow green blue purple pink brown black white - colored "
    "object dog cat car bus train apple bird"
).split()


def write_clip_tokenizer(path):
  """A ``CLIPTokenizer`` over ``WORDS`` (every word one BPE token, letters as fallbacks) saved to
  ``path``; its EOS (``<|endoftext|>``) is the largest id and doubles as padding, as in OpenAI's."""
  from transformers import CLIPTokenizer

  letters = "abcdefghijklmnopqrstuvwxyz-"
  vocab = {}
  for c in letters:
    vocab[c] = len(vocab)
  for c in letters:
    vocab[c + "</w>"] = len(vocab)
  merges = []
  for w in WORDS:
    toks = list(w[:-1]) + [w[-1] + "</w>"]
    while len(toks) > 1:
      a, b = toks[0], toks[1]
      if f"{a} {b}" not in merges:
        merges.append(f"{a} {b}")
      vocab.setdefault(a + b, len(vocab))
      toks = [a + b] + toks[2:]
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  raw = os.path.join(str(path), "raw")
  os.makedirs(raw, exist_ok=True)
  with open(os.path.join(raw, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(raw, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  tok = CLIPTokenizer(os.path.join(raw, "vocab.json"), os.path.join(raw, "merges.txt"))
  tok.save_pretrained(str(path))
  return tok


def hf_text_vision(vocab=128, eos=2, act="quick_gelu", image_size=32, patch=8, max_len=16):
  """``(text_config, vision_config)`` dicts of a tiny HF CLIP."""
  text = dict(
      vocab_size=vocab,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=64,
      max_position_embeddings=max_len,
      hidden_act=act,
      eos_token_id=eos,
      bos_token_id=min(vocab - 2, 49406),
      pad_token_id=1,
  )
  vision = dict(
      hidden_size=48,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=80,
      patch_size=patch,
      image_size=image_size,
      hidden_act=act,
  )
  return text, vision


def tiny_hf_clip(seed=0, **kw):
  from transformers import CLIPConfig, CLIPModel

  text, vision = hf_text_vision(**kw)
  torch.manual_seed(seed)
  return randomize(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)), seed)


def open_clip_cfg(vocab=128):
  return dict(
      embed_dim=24,
      vision_cfg=dict(image_size=32, layers=2, width=48, patch_size=8, head_width=12, mlp_ratio=2.0),
      text_cfg=dict(context_length=16, vocab_size=vocab, width=32, heads=4, layers=2),
  )


def import_open_clip():
  """open_clip, or a skip naming why it cannot be imported (it needs a torchvision built for the
  installed torch; a CUDA torchvision next to a CPU torch fails to load its ops)."""
  try:
    import open_clip
  except Exception as e:  # noqa: BLE001 - any import failure is a missing reference here
    pytest.skip(f"open_clip unavailable: {type(e).__name__}: {e}")
  return open_clip


def randomize(model, seed=0):
  """Every parameter perturbed (norm scales around 1, the rest ~ N(0, 0.5^2/fan_in)-ish), so a
  converter that drops or swaps any tensor changes the outputs."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      r = torch.randn(p.shape, generator=g)
      if p.ndim == 0:
        p.copy_(torch.tensor(np.log(50.0)) + 0.1 * r)
      elif ("norm" in name or ".ln" in name or name.startswith("ln")) and name.endswith("weight"):
        p.copy_(1 + 0.2 * r)
      elif p.ndim == 1:
        p.copy_(0.2 * r)
      else:
        fan_in = p[0].numel() if p.ndim > 1 else 1
        p.copy_(r / np.sqrt(fan_in) * (3.0 if "embedding" in name else 1.0))
  return model.eval()


def save_state_dict(path, model, drop=(), add=(), reshape=None):
  """``model.state_dict()`` as one safetensors file, with optional corruption (key lists)."""
  return write_ckpt(path, model, drop=drop, add=add, reshape=reshape, encoder=False)


def random_ids(rng, batch, length, eos, vocab_lo=0, bos=None, pad=None):
  """``int64[B, L]``: BOS, random tokens below ``eos``, EOS at a random position, then padding."""
  ids = rng.integers(vocab_lo, eos, (batch, length))
  for b in range(batch):
    end = int(rng.integers(2, length))
    if bos is not None:
      ids[b, 0] = bos
    ids[b, end] = eos
    ids[b, end + 1 :] = eos if pad is None else pad
  return ids


def geneval_crop(image, box, mask=None, size=224, background="#999"):
  """GenEval's crop (``evaluate_images.py``, ImageCrops) then open_clip's eval transform, with PIL:
  composite on #999, ``crop(box)``, shortest side -> size (bicubic), centre crop.

  Returns ``uint8[size, size, 3]`` (before ToTensor / Normalize).
  """
  im = Image.fromarray(image)
  if mask is not None:
    im = Image.composite(im, Image.new("RGB", im.size, color=background), Image.fromarray(mask))
  im = im.crop(tuple(box))
  w, h = im.size
  short, long = min(w, h), max(w, h)
  new = (size, int(size * long / short)) if w <= h else (int(size * long / short), size)
  im = im.resize(new, Image.BICUBIC)
  left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
  return np.asarray(im.crop((left, top, left + size, top + size)))


def save_tiny_clip_dir(d, seed=3):
  """A random tiny HF ``CLIPModel`` sized for ``write_clip_tokenizer``'s vocabulary, saved with
  that tokenizer in ``d``; returns (model, tokenizer)."""
  from transformers import CLIPConfig, CLIPModel

  tok = write_clip_tokenizer(d)
  eos = tok.convert_tokens_to_ids("<|endoftext|>")
  text = dict(
      vocab_size=len(tok),
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=64,
      max_position_embeddings=16,
      eos_token_id=eos,
      bos_token_id=eos - 1,
      pad_token_id=eos,
  )
  vision = dict(
      hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80, patch_size=8, image_size=32
  )
  torch.manual_seed(seed)
  model = randomize(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)), seed)
  model.save_pretrained(str(d))
  return model, tok


def tiny_hf_owl(kind="owlv2", seed=0, vocab_size=128):
  """A random tiny HF OWLv2 / OWL-ViT detector (4 x 4 patches of a 32 px input, text vocab
  ``vocab_size``), weights randomised by ``randomize`` with ``seed``."""
  from transformers import OwlViTConfig, OwlViTForObjectDetection, Owlv2Config, Owlv2ForObjectDetection

  text = dict(
      vocab_size=vocab_size,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=64,
      max_position_embeddings=16,
  )
  vision = dict(
      hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80, image_size=32, patch_size=8
  )
  cfg_cls, model_cls = (
      (Owlv2Config, Owlv2ForObjectDetection) if kind == "owlv2" else (OwlViTConfig, OwlViTForObjectDetection)
  )
  torch.manual_seed(seed)
  return randomize(model_cls(cfg_cls(text_config=text, vision_config=vision, projection_dim=32)), seed)


def save_tiny_owl_dir(d, kind="owlv2", seed=5):
  """A random tiny HF OWL detector (``tiny_hf_owl``) sized for ``write_clip_tokenizer``'s
  vocabulary, saved with that tokenizer in ``d``; returns (model, tokenizer)."""
  tok = write_clip_tokenizer(d)
  model = tiny_hf_owl(kind, seed, vocab_size=len(tok))
  model.save_pretrained(str(d))
  return model, tok
