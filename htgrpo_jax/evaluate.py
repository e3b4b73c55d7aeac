"""GenEval-style reporting: per-tag accuracy tables (Markdown) and captioned image grids (PNG)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

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


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
  """A held-out prompt: its caption, GenEval tag and metadata (JSON string) for the scorer."""
  text: str
  tag: str
  meta: str


def generate_images(sampler: Any, params: Any, layout: Any, decode: Callable[[jax.Array], jax.Array],
                    captions: Sequence[str], key: jax.Array, batch_size: int = 64) -> np.ndarray:
  """Samples one image per caption with a ``sampling.Sampler`` and decodes it on device.

  The last batch is padded to ``batch_size`` (one compiled shape for every call). Batch ``i``
  uses ``fold_in(key, i)``, so the same key gives the same images.

  Args:
    sampler: ``make_sampler(...)`` result (``sample(params, prompt, uncond, key) -> record``).
    params: policy params.
    layout: the model's layout (``encode_prompts``, ``unconditional_prompts``).
    decode: codes int32[B, N] -> uint8[B, H, W, 3] (the task's VQ decoder).
    captions: prompts.
    key: PRNG key.
    batch_size: sampler batch.

  Returns:
    uint8[len(captions), H, W, 3].
  """
  from htgrpo_jax import parallel
  mesh = getattr(sampler, "mesh", None)
  put = jnp.asarray if mesh is None else (lambda x: parallel.global_batch(x, mesh))
  out = []
  uncond = put(layout.unconditional_prompts(batch_size))
  for i in range(0, len(captions), batch_size):
    part = list(captions[i:i + batch_size])
    padded = part + [part[-1]] * (batch_size - len(part))
    rec = sampler.sample(params, put(layout.encode_prompts(padded)), uncond,
                         jax.random.fold_in(key, i))
    out.append(parallel.to_host(decode(rec.image_tokens))[:len(part)])
  return np.concatenate(out)


def evaluate_policy(sampler: Any, params: Any, layout: Any, decode: Callable[[jax.Array], jax.Array],
                    prompts: Sequence[EvalPrompt], key: jax.Array,
                    score: Callable[..., np.ndarray], samples_per_prompt: int = 1,
                    batch_size: int = 64) -> dict[str, Any]:
  """Samples ``samples_per_prompt`` images per prompt and scores them GenEval-style.

  Args:
    score: ``(captions, images, meta=[json, ...]) -> float32[B]`` strict 0/1 scores.

  Returns:
    dict with ``images`` uint8[P*G, H, W, 3] (each prompt's G samples contiguous), ``captions``,
    ``tags``, ``strict`` float32[P*G] and ``scores`` (per-tag strict accuracy + overall).
  """
  rep = [p for p in prompts for _ in range(samples_per_prompt)]
  captions = [p.text for p in rep]
  images = generate_images(sampler, params, layout, decode, captions, key, batch_size)
  strict = np.asarray(score(captions, images, [p.meta for p in rep]), np.float32)
  tags = [p.tag for p in rep]
  return dict(images=images, captions=captions, tags=tags, strict=strict,
              scores=tag_scores(tags, strict))


def comparison_table(columns: dict[str, dict[str, float]], title: str = "ShapeEval held-out") -> str:
  """Markdown table of per-tag scores side by side, e.g. ``{'base': {...}, 'HT-GRPO': {...}}``;
  the last column also shows its change from the first."""
  names = list(columns)
  tags = [t for t in columns[names[0]] if t != "overall"] + ["overall"]
  head = f"| {title} | " + " | ".join(names) + (" | change |" if len(names) > 1 else " |")
  lines = [head, "|---|" + "---:|" * (len(names) + (len(names) > 1))]
  for t in tags:
    vals = [columns[n].get(t, float("nan")) for n in names]
    cells = [f"{v:.3f}" for v in vals]
    if len(names) > 1:
      cells.append(f"{vals[-1] - vals[0]:+.3f}")
    name = f"**{t}**" if t == "overall" else t
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_curves(path: str | os.PathLike, train: Sequence[tuple[int, float]],
                evals: Sequence[tuple[int, float]] = (), title: str = "HT-GRPO") -> None:
  """Writes a PNG of the training reward per step (and its running mean) and the held-out strict
  accuracy at each evaluation."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
  if train:
    x, y = np.asarray(train, np.float64).T
    ax.plot(x, y, color="tab:blue", alpha=0.3, lw=1, label="train reward (batch mean)")
    w = max(1, min(10, len(y) // 5))
    ax.plot(x[w - 1:], np.convolve(y, np.ones(w) / w, "valid"), color="tab:blue", lw=2,
            label=f"train reward ({w}-step mean)")
  if evals:
    x, y = np.asarray(evals, np.float64).T
    ax.plot(x, y, "o-", color="tab:red", lw=2, label="held-out strict overall")
  ax.set_xlabel("RL step")
  ax.set_ylabel("score")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.set_title(title)
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
