"""GenEval-style reporting: per-tag accuracy tables (Markdown) and captioned image grids (PNG)."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from htgrpo_jax import paths
from htgrpo_jax.contracts import EvalPrompt
from htgrpo_jax.rewards.geneval import TAGS


def _save_png(image: Image.Image, path: str) -> None:
  """``image.save(path)`` for a local path; a URL through ``paths.open`` (PIL writes local files)."""
  if paths.is_url(path):
    with paths.open(path, "wb") as f:
      image.save(f, format="PNG")
  else:
    image.save(path)


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


def _tag_order(tags: Sequence[str]) -> list[str]:
  return [t for t in TAGS if t in set(tags)] + sorted(set(tags) - set(TAGS))


def bootstrap_draws(
    tags: Sequence[str], clusters: Sequence[int], scores: Sequence[Sequence[float]], n_boot: int = 2000, seed: int = 0
) -> dict[str, np.ndarray]:
  """Cluster-bootstrap draws of per-tag and overall accuracy for several score arrays at once.

  A cluster is one prompt with all its samples (GenEval draws several images per prompt; they are
  not independent). Clusters are resampled with replacement within each tag, and the SAME draw is
  applied to every array in ``scores``, so differences between arrays scored on the same prompts
  (base vs trained) get a paired interval.

  Args:
    tags: [S] tag of each sample.
    clusters: [S] int, the prompt a sample belongs to (samples of one prompt share one id).
    scores: A arrays of [S] scores (0/1 strict accuracy) in the same sample order.
    n_boot: bootstrap draws.
    seed: numpy seed of the draws.

  Returns:
    {tag or 'overall': float64[A, n_boot]}, 'overall' the mean over tags (GenEval's overall).
  """
  tags, clusters = np.asarray(tags), np.asarray(clusters)
  scores = np.asarray(scores, np.float64).reshape(-1, len(tags))
  rng = np.random.default_rng(seed)
  out = {}
  for t in _tag_order(list(tags)):
    sel = tags == t
    ids, inv = np.unique(clusters[sel], return_inverse=True)
    sums = np.stack([np.bincount(inv, weights=a[sel], minlength=len(ids)) for a in scores])
    counts = np.bincount(inv, minlength=len(ids)).astype(np.float64)
    draw = rng.integers(0, len(ids), (n_boot, len(ids)))
    out[t] = sums[:, draw].sum(-1) / counts[draw].sum(-1)  # [A, n_boot]
  out["overall"] = np.mean([out[t] for t in out], axis=0)
  return out


def interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
  """The central ``level`` percentile interval of bootstrap draws."""
  lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
  return float(lo), float(hi)


def tag_table(
    tags: Sequence[str], strict_scores: Sequence[float], title: str = "ShapeEval", clusters: Sequence[int] | None = None
) -> str:
  """A Markdown table: one row per tag (accuracy, sample count, and with ``clusters`` (the prompt
  id of each sample) a 95 % cluster-bootstrap interval) and the overall row."""
  acc = tag_scores(tags, strict_scores)
  counts = {t: int(np.sum(np.asarray(tags) == t)) for t in acc if t != "overall"}
  ci = (
      {t: interval(d[0]) for t, d in bootstrap_draws(tags, clusters, [strict_scores]).items()}
      if clusters is not None
      else None
  )
  cell = lambda t: f" {ci[t][0]:.3f}-{ci[t][1]:.3f} |" if ci else ""
  lines = [
      f"| {title} | strict accuracy |{' 95 % CI |' if ci else ''} n |",
      "|---|---:|" + ("---:|" if ci else "") + "---:|",
  ]
  lines += [f"| {t} | {acc[t]:.3f} |{cell(t)} {counts[t]} |" for t in counts]
  lines.append(f"| **overall** (mean over tags) | **{acc['overall']:.3f}** |{cell('overall')} " f"{len(tags)} |")
  return "\n".join(lines) + "\n"


def image_grid(
    images: np.ndarray,
    captions: Sequence[str],
    path: str | os.PathLike,
    cols: int = 8,
    scale: int = 4,
    caption_px: int = 10,
) -> np.ndarray:
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
    raise ValueError(f"image_grid: images must be uint8[B, H, W, 3], got " f"{images.dtype}{list(images.shape)}")
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
  paths.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  _save_png(grid, path)
  return np.asarray(grid)


def group_outcomes(strict: Sequence[float], group_size: int) -> dict[str, float]:
  """Fractions of prompt groups (G contiguous samples each) whose strict outcomes are mixed,
  all failures or all successes: the prompts on which GRPO has a learning signal are 'mixed'."""
  s = np.asarray(strict, np.float64)
  if group_size < 1 or s.ndim != 1 or s.shape[0] % group_size or not s.shape[0]:
    raise ValueError(f"group_outcomes: {s.shape[0]} scores do not split into groups of {group_size}")
  g = s.reshape(-1, group_size) > 0.5
  return {
      "mixed": float(np.mean(g.any(1) & ~g.all(1))),
      "all_fail": float(np.mean(~g.any(1))),
      "all_pass": float(np.mean(g.all(1))),
  }


def generate_images(
    sampler: Any,
    params: Any,
    layout: Any,
    decode: Callable[[jax.Array], jax.Array],
    captions: Sequence[str],
    key: jax.Array,
    batch_size: int = 64,
) -> np.ndarray:
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
    part = list(captions[i : i + batch_size])
    padded = part + [part[-1]] * (batch_size - len(part))
    rec = sampler.sample(params, put(layout.encode_prompts(padded)), uncond, jax.random.fold_in(key, i))
    out.append(parallel.to_host(decode(rec.image_tokens))[: len(part)])
  return np.concatenate(out)


def evaluate_policy(
    sampler: Any,
    params: Any,
    layout: Any,
    decode: Callable[[jax.Array], jax.Array],
    prompts: Sequence[EvalPrompt],
    key: jax.Array,
    score: Callable[..., np.ndarray],
    samples_per_prompt: int = 1,
    batch_size: int = 64,
    judge: Callable[..., list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
  """Samples ``samples_per_prompt`` images per prompt and scores them GenEval-style.

  Args:
    score: ``(captions, images, meta=[json, ...]) -> float32[B]`` strict 0/1 scores.
    judge: optional ``(captions, images, meta) -> [dict]`` with per-image ``strict`` and, where the
      judge knows them, ``reason`` and ``malformed`` (components that are no well-formed object);
      used instead of ``score`` when given, so each verdict comes with its reason.

  Returns:
    dict with ``images`` uint8[P*G, H, W, 3] (each prompt's G samples contiguous), ``captions``,
    ``tags``, ``metas``, ``prompt_index`` int[P*G] (the cluster of each sample), ``strict``
    float32[P*G], ``reasons`` (str per sample, '' when unknown), ``malformed`` int[P*G] (-1 when
    unknown) and ``scores`` (per-tag strict accuracy + overall).
  """
  if samples_per_prompt < 1:
    raise ValueError(f"samples_per_prompt={samples_per_prompt} must be >= 1")
  rep = [p for p in prompts for _ in range(samples_per_prompt)]
  captions = [p.text for p in rep]
  metas = [p.meta for p in rep]
  images = generate_images(sampler, params, layout, decode, captions, key, batch_size)
  if judge is not None:
    verdicts = judge(captions, images, metas)
    strict = np.asarray([float(v["strict"]) for v in verdicts], np.float32)
    reasons = [str(v.get("reason", "")) for v in verdicts]
    malformed = np.asarray([int(v.get("malformed", -1)) for v in verdicts], np.int64)
  else:
    strict = np.asarray(score(captions, images, metas), np.float32)
    reasons, malformed = [""] * len(rep), np.full(len(rep), -1, np.int64)
  tags = [p.tag for p in rep]
  return dict(
      images=images,
      captions=captions,
      tags=tags,
      metas=metas,
      strict=strict,
      prompt_index=np.repeat(np.arange(len(prompts)), samples_per_prompt),
      reasons=reasons,
      malformed=malformed,
      scores=tag_scores(tags, strict),
  )


def hacking_watch(res: dict[str, Any]) -> dict[str, float]:
  """Signs of a policy gaming its judge, from an ``evaluate_policy`` result: the share of images
  holding components that are no well-formed object (fragments, blobs, single patches), overall
  and among the images the judge accepted (0 for a judge that rejects them, by construction)."""
  m = np.asarray(res["malformed"])
  if m.size == 0 or (m < 0).all():
    return {}
  ok = np.asarray(res["strict"]) > 0.5
  return {
      "malformed_share": float(np.mean(m > 0)),
      "malformed_share_accepted": float(np.mean(m[ok] > 0)) if ok.any() else 0.0,
  }


def sample_diversity(images: np.ndarray, prompt_index: np.ndarray) -> float | None:
  """How different a prompt's samples are from each other: the share of pixels (any channel) that
  differ between two samples of one prompt, averaged over its pairs and then over the prompts with
  two or more samples. 0 when a policy draws the same picture every time for a prompt; GenEval's
  rules (and the strict judge) do not see that, so evaluations report it beside the score.

  Args:
    images: uint8[M, H, W, C].
    prompt_index: int[M], the prompt of each sample.

  Returns:
    float in [0, 1], or None when no prompt has two samples.
  """
  images, prompt_index = np.asarray(images), np.asarray(prompt_index)
  if len(images) != len(prompt_index):
    raise ValueError(f"images has {len(images)} samples, prompt_index {len(prompt_index)}")
  per_prompt = []
  for p in np.unique(prompt_index):
    x = images[prompt_index == p].reshape(int((prompt_index == p).sum()), -1, images.shape[-1])
    if len(x) < 2:
      continue
    i, j = np.triu_indices(len(x), k=1)
    per_prompt.append(float((x[i] != x[j]).any(axis=-1).mean()))
  return float(np.mean(per_prompt)) if per_prompt else None


def read_samples(eval_dir: str | os.PathLike) -> dict[str, Any]:
  """An evaluation folder written by ``write_samples`` read back: ``images`` uint8[M, H, W, 3],
  ``prompt_index`` int[M], ``strict`` float32[M], ``malformed`` int[M] and ``tags``."""
  import json

  path = paths.join(eval_dir, "samples.jsonl")
  if not paths.exists(path):
    raise FileNotFoundError(f"{path}: no samples.jsonl (an evaluation folder is <workdir>/evals/<name>)")
  with paths.open(path, encoding="utf-8") as f:
    recs = [json.loads(line) for line in f if line.strip()]

  def image(name: str) -> np.ndarray:
    with paths.open(paths.join(eval_dir, name), "rb") as f:
      return np.asarray(Image.open(f).convert("RGB"))

  return dict(
      images=np.stack([image(r["filename"]) for r in recs]),
      prompt_index=np.asarray([r["prompt_index"] for r in recs]),
      strict=np.asarray([float(r["correct"]) for r in recs], np.float32),
      malformed=np.asarray([int(r.get("malformed", -1)) for r in recs]),
      tags=[r["tag"] for r in recs],
  )


def eval_watch(res: dict[str, Any]) -> dict[str, float]:
  """What an evaluation reports beside its scores: ``hacking_watch`` and ``sample_diversity``
  (when some prompt has two samples)."""
  out = hacking_watch(res)
  d = sample_diversity(res["images"], res["prompt_index"]) if len(res.get("images", ())) else None
  if d is not None:
    out["sample_diversity"] = d
  return out


def write_samples(out_dir: str | os.PathLike, res: dict[str, Any]) -> str:
  """Every evaluated sample as GenEval writes its results: ``images/<prompt>_<k>.png`` plus one
  ``samples.jsonl`` line per image (prompt, tag, metadata, image file, verdict, reason), so the
  same images can be re-scored by another checker. Returns the JSONL path."""
  import json

  out_dir = os.fspath(out_dir)
  paths.makedirs(paths.join(out_dir, "images"), exist_ok=True)
  seen: dict[int, int] = {}
  lines = []
  for i, img in enumerate(res["images"]):
    p = int(res["prompt_index"][i])
    k = seen[p] = seen.get(p, -1) + 1
    name = os.path.join("images", f"{p:05d}_{k}.png")
    _save_png(Image.fromarray(np.asarray(img)), paths.join(out_dir, name))
    meta = res["metas"][i]
    try:
      meta = json.loads(meta)
    except (TypeError, ValueError):
      pass
    lines.append(
        json.dumps(
            dict(
                prompt=res["captions"][i],
                tag=res["tags"][i],
                metadata=meta,
                prompt_index=p,
                sample=k,
                filename=name,
                correct=bool(res["strict"][i] > 0.5),
                reason=res["reasons"][i],
                malformed=int(res["malformed"][i]),
            )
        )
    )
  path = paths.join(out_dir, "samples.jsonl")
  paths.write_text_atomic(path, "\n".join(lines) + "\n")
  return path


def comparison_table(
    columns: dict[str, dict[str, float]],
    title: str = "ShapeEval held-out",
    intervals: dict[str, dict[str, tuple[float, float]]] | None = None,
    change_intervals: dict[str, tuple[float, float]] | None = None,
) -> str:
  """Markdown table of per-tag scores side by side, e.g. ``{'base': {...}, 'HT-GRPO': {...}}``;
  the last column also shows its change from the first. ``intervals`` ({column: {tag: (lo, hi)}})
  and ``change_intervals`` ({tag: (lo, hi)}, a paired interval of the change) add 95 % CIs."""
  names = list(columns)
  tags = [t for t in columns[names[0]] if t != "overall"] + ["overall"]
  head = f"| {title} | " + " | ".join(names) + (" | change |" if len(names) > 1 else " |")
  lines = [head, "|---|" + "---:|" * (len(names) + (len(names) > 1))]
  ci = lambda lo_hi: f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]"
  for t in tags:
    vals = [columns[n].get(t, float("nan")) for n in names]
    cells = [
        f"{v:.3f}" + (ci(intervals[n][t]) if intervals and t in intervals.get(n, {}) else "")
        for n, v in zip(names, vals)
    ]
    if len(names) > 1:
      cells.append(
          f"{vals[-1] - vals[0]:+.3f}" + (ci(change_intervals[t]) if change_intervals and t in change_intervals else "")
      )
    name = f"**{t}**" if t == "overall" else t
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_curves(
    path: str | os.PathLike,
    train: Sequence[tuple[int, float]],
    evals: Sequence[tuple[int, float]] = (),
    title: str = "HT-GRPO",
) -> None:
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
    ax.plot(
        x[w - 1 :],
        np.convolve(y, np.ones(w) / w, "valid"),
        color="tab:blue",
        lw=2,
        label=f"train reward ({w}-step mean)",
    )
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
  paths.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  if paths.is_url(path):
    with paths.open(path, "wb") as f:
      fig.savefig(f, format=os.path.splitext(path)[1][1:] or "png")
  else:
    fig.savefig(path)
  plt.close(fig)
