"""GenEval-style reporting: per-tag accuracy tables (Markdown) and captioned image grids (PNG)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from htgrpo_jax.data.prompts import TAGS


def tag_scores(tags: Sequence[str], scores: Sequence[float]) -> dict[str, float]:
  """Mean score per tag (tags in GenEval order first) plus 'overall' = mean over tags.

  GenEval's overall is the unweighted mean of the per-tag accuracies, not the mean over prompts.
  """
  scores = np.asarray(scores, np.float64)
  if len(tags) != scores.shape[0] or scores.ndim != 1:
    raise ValueError(f"tag_scores: {len(tags)} tags for scores of shape {scores.shape}")
  if not len(tags):
    raise ValueError("tag_scores: no scores")
  if not np.all(np.isfinite(scores)):
    raise ValueError("tag_scores: non-finite scores")
  order = [t for t in TAGS if t in set(tags)] + sorted(set(tags) - set(TAGS))
  tags = np.asarray(tags)
  out = {t: float(scores[tags == t].mean()) for t in order}
  out["overall"] = float(np.mean(list(out.values())))
  return out


def tag_table(tags: Sequence[str], strict_scores: Sequence[float], title: str = "ShapeEval") -> str:
  """A Markdown table: one row per tag (accuracy and sample count) and the overall row."""
  acc = tag_scores(tags, strict_scores)
  counts = {t: int(np.sum(np.asarray(tags) == t)) for t in acc if t != "overall"}
  lines = [f"| {title} | strict accuracy | n |", "|---|---:|---:|"]
  lines += [f"| {t} | {acc[t]:.3f} | {counts[t]} |" for t in counts]
  lines.append(f"| **overall** (mean over tags) | **{acc['overall']:.3f}** | {len(tags)} |")
  return "\n".join(lines) + "\n"


def image_grid(images: np.ndarray, captions: Sequence[str], path: str | os.PathLike,
               cols: int = 8, scale: int = 4, caption_px: int = 10) -> np.ndarray:
  """Writes a PNG grid of images, each upscaled ``scale`` x (nearest) over its caption.

  Args:
    images: uint8[B, H, W, 3].
    captions: B strings (wrapped to the tile width; ``"\\n"`` forces breaks).
    path: output .png path (parent folders are created).
    cols: tiles per row.
    scale: integer nearest-neighbour upscale so 32 px scenes are legible.
    caption_px: height of one caption line in px.

  Returns:
    uint8[H', W', 3], the grid as written.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"image_grid: images must be uint8[B, H, W, 3], got "
                     f"{images.dtype}{list(images.shape)}")
  if len(captions) != images.shape[0] or not len(captions):
    raise ValueError(f"image_grid: {len(captions)} captions for {images.shape[0]} images")
  b, h, w, _ = images.shape
  tw, th = w * scale, h * scale
  font = ImageFont.load_default()
  chars = max(4, tw // 6)  # the default bitmap font is ~6 px per character

  def wrap(text: str) -> list[str]:
    lines = []
    for para in text.split("\n"):
      line = ""
      for word in para.split():
        if line and len(line) + 1 + len(word) > chars:
          lines.append(line)
          line = word
        else:
          line = f"{line} {word}".strip()
      lines.append(line)
    return lines

  wrapped = [wrap(c) for c in captions]
  cap_h = caption_px * max(len(x) for x in wrapped) + 4
  cols = min(cols, b)
  rows = -(-b // cols)
  grid = Image.new("RGB", (cols * (tw + 4), rows * (th + cap_h + 4)), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  for i, (img, lines) in enumerate(zip(images, wrapped)):
    x0, y0 = (i % cols) * (tw + 4) + 2, (i // cols) * (th + cap_h + 4) + 2
    grid.paste(Image.fromarray(img).resize((tw, th), Image.NEAREST), (x0, y0))
    for j, line in enumerate(lines):
      draw.text((x0, y0 + th + 2 + j * caption_px), line, fill=(0, 0, 0), font=font)
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  grid.save(path)
  return np.asarray(grid)


def group_outcomes(strict: Sequence[float], group_size: int) -> dict[str, float]:
  """Fractions of prompt groups (G contiguous samples each) whose strict outcomes are mixed,
  all failures or all successes: the prompts on which GRPO has a learning signal are 'mixed'."""
  s = np.asarray(strict, np.float64)
  if group_size < 1 or s.ndim != 1 or s.shape[0] % group_size or not s.shape[0]:
    raise ValueError(f"group_outcomes: {s.shape[0]} scores do not split into groups of {group_size}")
  g = s.reshape(-1, group_size) > 0.5
  return {"mixed": float(np.mean(g.any(1) & ~g.all(1))), "all_fail": float(np.mean(~g.any(1))),
          "all_pass": float(np.mean(g.all(1)))}


def generate_images(sampler: Any, params: Any, layout: Any, codebook: Any,
                    captions: Sequence[str], key: jax.Array, batch_size: int = 64) -> np.ndarray:
  """Samples one image per caption with a ``sampling.Sampler`` and VQ-decodes it.

  The last batch is padded to ``batch_size`` (one compiled shape for every call).

  Args:
    sampler: ``make_sampler(...)`` result (``sample(params, prompt, uncond, key) -> record``).
    params: policy params.
    layout: the model's layout (``encode_prompts``, ``unconditional_prompts``).
    codebook: float32[K, p*p*3] VQ codebook.
    captions: B prompts.
    key: PRNG key (folded with the batch index).
    batch_size: sampler batch.

  Returns:
    uint8[B, H, W, 3].
  """
  from htgrpo_jax.data import vq  # local: keeps table/grid helpers free of the JAX data stack
  out = []
  for i in range(0, len(captions), batch_size):
    part = list(captions[i:i + batch_size])
    padded = part + [part[-1]] * (batch_size - len(part))
    rec = sampler.sample(params, jnp.asarray(layout.encode_prompts(padded)),
                         jnp.asarray(layout.unconditional_prompts(batch_size)),
                         jax.random.fold_in(key, i))
    out.append(np.asarray(vq.decode(codebook, rec.image_tokens))[:len(part)])
  return np.concatenate(out)


def evaluate_policy(sampler: Any, params: Any, layout: Any, codebook: Any, prompts: Sequence[Any],
                    key: jax.Array, samples_per_prompt: int = 1, batch_size: int = 64,
                    reward: Any = None) -> dict[str, Any]:
  """Samples ``samples_per_prompt`` images per ``data.prompts.Prompt`` and scores them.

  Returns:
    dict with ``images`` uint8[P*G, H, W, 3] (each prompt's G samples contiguous), ``captions``,
    ``tags``, ``strict`` and ``dense`` float32[P*G], and ``scores`` (per-tag strict + overall).
  """
  from htgrpo_jax.rewards.shapes import ShapeEvalReward
  reward = reward or ShapeEvalReward()
  rep = [p for p in prompts for _ in range(samples_per_prompt)]
  captions = [p.text for p in rep]
  images = generate_images(sampler, params, layout, codebook, captions, key, batch_size)
  details = reward.details(captions, images, meta=[p.meta for p in rep])
  strict = np.array([d["strict"] for d in details], np.float32)
  tags = [p.meta.tag for p in rep]
  return dict(images=images, captions=captions, tags=tags, strict=strict,
              dense=np.array([d["dense"] for d in details], np.float32),
              scores=tag_scores(tags, strict))
