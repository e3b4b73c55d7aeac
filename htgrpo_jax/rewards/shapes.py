"""The ShapeEval verifier: finds objects in pixels and scores prompts the GenEval way.

Detection sees only the image (never the scene that produced it):
  1. every pixel goes to its nearest palette colour (or the background), and to none when it is
     further than ``max_color_dist`` from all of them (blended VQ patches, artefacts);
  2. per colour, 4-connected components; components under ``min_area`` px are noise;
  3. the shape comes from robust geometry of the component: its bounding box after trimming
     edge rows / columns holding a single pixel (stray pixels would otherwise inflate the box),
     the fill of the four k x k corner regions (square: all full; circle: all empty-ish;
     triangle: top empty, bottom full) and the fill ratio of the trimmed box. Components that
     match no shape (merged objects, scribbles) count as ``shape=None`` and satisfy nothing;
  4. the position is the component's centroid.

Scoring (per prompt, against its ``PromptMeta``) follows GenEval: each required object must be
found with its shape (and colour, when asked) ``count`` times, counting prompts fail on extra
instances, and a relation holds when some pair of matching objects has centroids offset by more
than ``position_margin * canvas`` along the relation's axis. ``strict`` is 1 when every check
passes; ``dense`` (for RL) is the mean of the partial checks, in [0, 1], and equals 1 exactly
when ``strict`` does.

Prompts without metadata are parsed against the grammar; an unknown word or an empty prompt
raises ValueError naming it, or scores 0 when the reward was built with ``on_invalid='zero'``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from htgrpo_jax.data import prompts as grammar
from htgrpo_jax.data.prompts import PromptMeta
from htgrpo_jax.data.shapeworld import WorldConfig
from htgrpo_jax.rewards.base import check_images

_FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])


@dataclasses.dataclass(frozen=True)
class VerifierConfig:
  """Detector and scoring thresholds.

  Attributes:
    max_color_dist: RGB L2 distance beyond which a pixel has no colour.
    min_area: components smaller than this (px) are noise.
    position_margin: a relation needs a centroid offset > margin * canvas px.
  """
  max_color_dist: float = 80.0
  min_area: int = 12
  position_margin: float = 0.1


@dataclasses.dataclass(frozen=True)
class Detection:
  """One detected object. ``shape`` is None when the geometry matches no shape."""
  shape: str | None
  color: str
  cx: float
  cy: float
  area: int
  bbox: tuple[int, int, int, int]  # y0, x0, y1, x1 (exclusive) of the trimmed box


def _trim(mask: np.ndarray) -> tuple[int, int, int, int]:
  """Bounding box of ``mask`` after peeling edge rows/columns that hold a single pixel."""
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
  changed = True
  while changed:
    changed = False
    if y1 - y0 > 2 and mask[y0, x0:x1].sum() <= 1:
      y0, changed = y0 + 1, True
    if y1 - y0 > 2 and mask[y1 - 1, x0:x1].sum() <= 1:
      y1, changed = y1 - 1, True
    if x1 - x0 > 2 and mask[y0:y1, x0].sum() <= 1:
      x0, changed = x0 + 1, True
    if x1 - x0 > 2 and mask[y0:y1, x1 - 1].sum() <= 1:
      x1, changed = x1 - 1, True
  return y0, x0, y1, x1


def shape_features(mask: np.ndarray) -> dict[str, float]:
  """Geometry of one component.

  Args:
    mask: bool[H, W], True on the component's pixels.

  Returns:
    dict with ``fill`` (area / trimmed box area), ``aspect`` (h / w of the trimmed box),
    ``top`` / ``bottom`` (mean fill of the two top / bottom k x k corner regions) and ``bbox``.
  """
  y0, x0, y1, x1 = _trim(mask)
  box = mask[y0:y1, x0:x1]
  h, w = box.shape
  k = max(1, int(round(min(h, w) / 4)))
  corner = lambda a: float(a.mean())
  return dict(fill=float(box.mean()), aspect=h / w,
              top=(corner(box[:k, :k]) + corner(box[:k, -k:])) / 2,
              bottom=(corner(box[-k:, :k]) + corner(box[-k:, -k:])) / 2,
              bbox=(int(y0), int(x0), int(y1), int(x1)))


def classify(f: dict[str, float]) -> str | None:
  """Shape name from ``shape_features`` output, or None when nothing fits."""
  if not 0.6 <= f["aspect"] <= 1.67:
    return None
  top, bottom, fill = f["top"], f["bottom"], f["fill"]
  if top >= 0.75 and bottom >= 0.75 and fill >= 0.85:
    return "square"
  if top <= 0.35 and bottom >= 0.5 and 0.35 <= fill <= 0.8:
    return "triangle"
  if top <= 0.5 and bottom <= 0.5 and abs(top - bottom) <= 0.3 and 0.6 <= fill <= 0.92:
    return "circle"
  return None


@functools.lru_cache(maxsize=8)
def _palette(cfg: WorldConfig) -> tuple[np.ndarray, tuple[str, ...]]:
  names = cfg.color_names
  return np.array([cfg.rgb(n) for n in names] + [cfg.background], np.float32), names


def detect(image: np.ndarray, cfg: WorldConfig = WorldConfig(),
           vcfg: VerifierConfig = VerifierConfig()) -> list[Detection]:
  """Objects in one image.

  Args:
    image: uint8[H, W, 3].

  Returns:
    Detections sorted by (colour, cy, cx).
  """
  pal, names = _palette(cfg)
  d = np.linalg.norm(np.asarray(image, np.float32)[:, :, None, :] - pal, axis=-1)  # [H, W, C+1]
  label = np.where(d.min(-1) <= vcfg.max_color_dist, d.argmin(-1), -1)
  out = []
  for ci, name in enumerate(names):
    comps, n = ndimage.label(label == ci, structure=_FOUR_CONNECTED)
    for j in range(1, n + 1):
      m = comps == j
      area = int(m.sum())
      if area < vcfg.min_area:
        continue
      f = shape_features(m)
      ys, xs = np.nonzero(m)
      out.append(Detection(classify(f), name, float(xs.mean() + 0.5), float(ys.mean() + 0.5),
                           area, f["bbox"]))
  return sorted(out, key=lambda t: (t.color, t.cy, t.cx))


def _relation_offset(a: Detection, b: Detection, relation: str) -> float:
  return {"left of": b.cx - a.cx, "right of": a.cx - b.cx,
          "above": b.cy - a.cy, "below": a.cy - b.cy}[relation]


def score(meta: PromptMeta, dets: Sequence[Detection], canvas: int,
          vcfg: VerifierConfig = VerifierConfig()) -> tuple[float, float]:
  """GenEval-style (strict, dense) scores of one image's detections against a prompt.

  Returns:
    strict in {0., 1.}, dense in [0, 1]; dense == 1 iff strict == 1.
  """
  known = [d for d in dets if d.shape is not None]
  match = lambda o: [d for d in known if d.shape == o.shape and (o.color is None or
                                                                 d.color == o.color)]
  checks = []
  for o in meta.objects:
    n_shape = sum(d.shape == o.shape for d in known)
    checks.append(min(n_shape, o.count) / o.count)
    if o.color is not None:
      checks.append(min(len(match(o)), o.count) / o.count)
    if meta.tag == "counting":  # GenEval's exclude: exactly ``count``, not more
      checks.append(0.0 if n_shape == 0 else min(1.0, o.count / n_shape))
  if meta.relation is not None:
    margin = vcfg.position_margin * canvas
    a_s, b_s = match(meta.objects[0]), match(meta.objects[1])
    ok = any(a is not b and _relation_offset(a, b, meta.relation) > margin
             for a in a_s for b in b_s)
    checks.append(1.0 if ok else 0.0)
  strict = float(all(c == 1.0 for c in checks))
  return strict, float(np.mean(checks))


@functools.lru_cache(maxsize=8)
def _grammar_table(cfg: WorldConfig) -> tuple[dict[str, PromptMeta], frozenset[str]]:
  return {p.text: p.meta for p in grammar.all_prompts(cfg)}, frozenset(grammar.vocabulary(cfg))


def parse_prompt(text: str, cfg: WorldConfig = WorldConfig()) -> PromptMeta:
  """The metadata of a grammar prompt.

  Raises:
    ValueError naming the prompt and, when there is one, the unknown word.
  """
  table, vocab = _grammar_table(cfg)
  if not isinstance(text, str) or not text.strip():
    raise ValueError(f"ShapeEval prompt {text!r} is empty")
  words = text.split()
  unknown = [w for w in words if w not in vocab]
  if unknown:
    raise ValueError(f"ShapeEval prompt {text!r}: unknown word(s) {unknown}; "
                     f"the vocabulary is {sorted(vocab)}")
  meta = table.get(" ".join(words))
  if meta is None:
    raise ValueError(f"ShapeEval prompt {text!r} uses known words but is not a sentence of the "
                     "grammar (see htgrpo_jax.data.prompts)")
  return meta


class ShapeEvalReward:
  """The verifier as a ``RewardFn``.

  ``reward(prompts, images, meta=None) -> float32[B]``; ``meta`` is an optional list of
  ``PromptMeta`` (or their JSON), otherwise each prompt is parsed.

  Args:
    cfg: the world (palette, canvas).
    mode: 'strict' (GenEval 0/1) or 'dense' (partial score for RL).
    on_invalid: 'raise' (default) or 'zero': score prompts that do not parse as 0.
    vcfg: detector thresholds.
  """

  def __init__(self, cfg: WorldConfig = WorldConfig(), mode: str = "strict",
               on_invalid: str = "raise", vcfg: VerifierConfig = VerifierConfig()):
    if mode not in ("strict", "dense"):
      raise ValueError(f"ShapeEvalReward mode={mode!r}; expected 'strict' or 'dense'")
    if on_invalid not in ("raise", "zero"):
      raise ValueError(f"ShapeEvalReward on_invalid={on_invalid!r}; expected 'raise' or 'zero'")
    self.cfg, self.mode, self.on_invalid, self.vcfg = cfg, mode, on_invalid, vcfg
    self.name = f"shapeeval_{mode}"

  def _metas(self, prompts: Sequence[str], meta: Sequence[Any] | None) -> list[PromptMeta | None]:
    if meta is not None:
      if len(meta) != len(prompts):
        raise ValueError(f"reward {self.name!r}: {len(meta)} meta entries for {len(prompts)} prompts")
      return [m if isinstance(m, PromptMeta) else PromptMeta.from_json(m) for m in meta]
    out = []
    for p in prompts:
      try:
        out.append(parse_prompt(p, self.cfg))
      except ValueError as e:
        if self.on_invalid == "raise":
          raise ValueError(f"reward {self.name!r}: {e}") from None
        out.append(None)
    return out

  def details(self, prompts: Sequence[str], images: np.ndarray, meta: Sequence[Any] | None = None
              ) -> list[dict[str, Any]]:
    """Per image: {'prompt', 'meta', 'detections', 'strict', 'dense'} for debugging."""
    images = check_images(self.name, prompts, images)
    if images.shape[1:3] != (self.cfg.canvas, self.cfg.canvas):
      raise ValueError(f"reward {self.name!r}: images are {images.shape[1]}x{images.shape[2]}, "
                       f"the world's canvas is {self.cfg.canvas}")
    out = []
    for p, m, img in zip(prompts, self._metas(prompts, meta), images):
      dets = detect(img, self.cfg, self.vcfg)
      s, d = score(m, dets, self.cfg.canvas, self.vcfg) if m is not None else (0.0, 0.0)
      out.append(dict(prompt=p, meta=m, detections=dets, strict=s, dense=d))
    return out

  def __call__(self, prompts: Sequence[str], images: np.ndarray, meta: Sequence[Any] | None = None,
               **unused: Any) -> np.ndarray:
    return np.array([r[self.mode] for r in self.details(prompts, images, meta)], np.float32)
