"""The ShapeEval verifier: exact objects from pixels, judged by GenEval's rules.

It is both the RL reward and the held-out judge, so it must not be gameable: a policy that emits
4x4 VQ patches should score only by drawing the asked scene.

Detection sees only the image (never the scene that produced it):
  1. every pixel goes to its nearest palette colour (or the background), and to no colour when it
     is further than ``max_color_dist`` from all of them (blended patches, masked slots);
  2. per colour (off-palette pixels form their own group), 8-connected components; components of
     fewer than ``min_area`` px are specks and are ignored (see below);
  3. a component is an OBJECT only when its pixels equal the world's own footprint
     (``scenes.shape_mask``) of one of its shapes at one of ``cfg.sizes``, compared at the
     component's tight bounding box, up to ``shape_tolerance`` differing pixels. Everything else
     (fragments, single patches, blobs, touching same-colour objects, shapes at other sizes,
     upside-down triangles, off-palette areas, the all-red canvas) is MALFORMED;
  4. an object's box is the tight box of its pixels, (x0, y0, x1, y1), what a detector reports.

Calibration (measured on the default world, see tests/worlds/shapeeval/test_verifier_adversarial.py):
  * ``shape_tolerance = 0``. Ground truth decodes exactly (every aligned patch is a codebook
    entry), so it needs no tolerance, while replacing one patch of a true render by another
    pattern of the world changes as little as 1 px (6 such edits; 84 change 3 px), so any
    tolerance >= 1 would accept patch-edited shapes.
  * ``min_area = 4``. Every non-background pattern of the world's patch vocabulary holds >= 4
    connected px (the apex patches of the 8 px triangle hold exactly 4), so nothing a policy
    emits through the codebook is ever a speck. Specks cannot help pass anything: a speck is a
    whole same-colour component, so ignoring it judges exactly the image in which its pixels are
    background, and it is smaller than any object, so it hides none.

Scoring: the prompt's ``PromptMeta`` becomes GenEval's metadata record
(``prompts.geneval_metadata``), the objects become detections of class = shape, colour = colour,
score 1.0, and ``geneval.evaluate(..., ties='adversarial')`` decides. Exact scores tie, so an
extra object of an asked class must satisfy the colour and position checks too: hedging "a red
circle" with a red, a blue and a green circle fails, and same-class position prompts ("a red
circle below a green circle") compare the red circles with the green ones (the reading in
``rewards/geneval.py``). Position is GenEval's ``relative_position`` on the boxes.

  strict  1.0 iff every GenEval check passes AND the image holds no malformed component.
  dense   (the RL reward) P * Q in [0, 1], 1.0 exactly when strict is:
          P  the mean partial credit of GenEval's checks (``geneval.Verdict.dense``: count
             min(found, n)/n, colour of the worst tie ordering, position 1/0, exclude 1/0), where
             a check that a malformed component could spoil gets 0: one whose area could hold an
             object of the check's class (>= the class's smallest footprint) and whose colour
             makes it a candidate of the clause (a foreign colour for a colour check; a candidate
             of either clause for a position check; any colour for an exclude check);
          Q  0.5 ** (malformed px / ``junk_half_life``): each 32 px of junk halves the reward.
How lenient dense is, and why. It is lenient about what is missing (a right shape in a wrong
colour earns the count credit, a right pair in the wrong relation earns all but the position
credit), because group-relative RL needs graded rewards while a policy is still poor, and it
grades junk by area rather than zeroing it, so a right scene with one stray patch (Q = 0.71) still
beats a clean scene with a wrong colour (0.5). It is not lenient where leniency could pay:
  * adding a malformed component never increases dense: its pixels either stay apart (P is
    unchanged, Q drops) or merge with same-colour objects and components into one malformed
    component; an object absorbed that way leaves behind a component large enough to hold it, of
    its colour, which spoils every check whose credit losing that object could raise (colour
    checks it made impure, position pairs it broke, exclude clauses it exceeded), the count
    credits can only drop, and Q drops. (Specks never change anything, above.)
  * adding a hedged extra object (one more instance of an asked class, in any colour, to a scene
    that already holds the clause's count) never increases dense: counts are capped, the colour
    credit is the worst tie ordering's, the position check covers every pair and the exclude
    check counts it.
Both are property-tested over random scenes with random junk and hedges.

Prompts without metadata are parsed against the grammar; an unknown word or an empty prompt
raises ValueError naming it, or scores 0 when the reward was built with ``on_invalid='zero'``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from htgrpo_jax.rewards import geneval
from htgrpo_jax.rewards.base import check_images
from htgrpo_jax.worlds.shapeeval import grammar, scenes
from htgrpo_jax.worlds.shapeeval.grammar import PromptMeta
from htgrpo_jax.worlds.shapeeval.scenes import WorldConfig

_EIGHT_CONNECTED = np.ones((3, 3), bool)


@dataclasses.dataclass(frozen=True)
class VerifierConfig:
  """Detector and scoring settings (defaults calibrated in the module docstring).

  Attributes:
    max_color_dist: RGB L2 distance beyond which a pixel has no palette colour.
    min_area: components with fewer px are specks and are ignored.
    shape_tolerance: px by which a component may differ from a world footprint and still be an
      object.
    junk_half_life: malformed px that halve the dense reward.
  """

  max_color_dist: float = 80.0
  min_area: int = 4
  shape_tolerance: int = 0
  junk_half_life: float = 32.0

  def __post_init__(self):
    if self.min_area < 1 or self.shape_tolerance < 0 or not self.junk_half_life > 0:
      raise ValueError(
          f"VerifierConfig: min_area >= 1, shape_tolerance >= 0 and " f"junk_half_life > 0 required, got {self}"
      )


@dataclasses.dataclass(frozen=True)
class Detection:
  """One detected component: a well-formed object, or a malformed one (``shape is None``).

  Attributes:
    shape: the matched world shape, None when malformed.
    color: palette colour name; None for off-palette pixels.
    cx, cy: centre of the tight box in px.
    area: pixels in the component.
    bbox: (y0, x0, y1, x1) tight box, exclusive ends.
    size: the matched world size (box side in px), None when malformed.
    mismatch: px differing from the matched footprint.
    reason: why the component is malformed ('' for objects).
  """

  shape: str | None
  color: str | None
  cx: float
  cy: float
  area: int
  bbox: tuple[int, int, int, int]
  size: int | None = None
  mismatch: int = 0
  reason: str = ""

  @property
  def malformed(self) -> bool:
    return self.shape is None

  @property
  def box(self) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in px, GenEval's box convention."""
    y0, x0, y1, x1 = self.bbox
    return float(x0), float(y0), float(x1), float(y1)


@dataclasses.dataclass(frozen=True)
class Judgement:
  """The verifier's decision on one image (see the module docstring).

  Attributes:
    strict: 1.0 iff GenEval passes and nothing is malformed.
    dense: the RL reward in [0, 1].
    verdict: GenEval's verdict on the well-formed objects.
    malformed: number of malformed components.
    malformed_area: their px.
    reason: GenEval's reasons and one line per malformed component ('' when strict is 1).
  """

  strict: float
  dense: float
  verdict: geneval.Verdict
  malformed: int
  malformed_area: int
  reason: str


@dataclasses.dataclass(frozen=True)
class _Template:
  shape: str
  size: int
  mask: np.ndarray  # bool[h, w]: the footprint cropped to its tight box


@functools.lru_cache(maxsize=8)
def _templates(cfg: WorldConfig) -> dict[tuple[int, int], tuple[_Template, ...]]:
  """World footprints keyed by their tight (h, w)."""
  out: dict[tuple[int, int], list[_Template]] = {}
  for shape in cfg.shapes:
    for size in cfg.sizes:
      y0, x0, y1, x1 = scenes.footprint_extent(shape, size)
      m = scenes.shape_mask(shape, size)[y0:y1, x0:x1]
      out.setdefault(m.shape, []).append(_Template(shape, size, m))
  return {k: tuple(v) for k, v in out.items()}


@functools.lru_cache(maxsize=8)
def _min_object_area(cfg: WorldConfig, shape: str | None, tolerance: int) -> int:
  """The fewest px an object of ``shape`` (any shape when None) can have."""
  shapes = cfg.shapes if shape is None or shape not in cfg.shapes else (shape,)
  return min(int(scenes.shape_mask(s, z).sum()) for s in shapes for z in cfg.sizes) - tolerance


@functools.lru_cache(maxsize=8)
def _palette(cfg: WorldConfig) -> np.ndarray:
  """float32[C+1, 3]: the colours in ``cfg.color_names`` order, then the background."""
  return np.array([cfg.rgb(n) for n in cfg.color_names] + [cfg.background], np.float32)


def _pixel_labels(images: np.ndarray, cfg: WorldConfig, vcfg: VerifierConfig) -> np.ndarray:
  """int8[B, H, W]: colour index (``cfg.color_names``), C for background, -1 for off-palette."""
  pal = _palette(cfg)
  x = images.astype(np.float32)
  d2 = np.stack([((x - c) ** 2).sum(-1) for c in pal], -1)  # [B, H, W, C+1]
  idx = d2.argmin(-1)
  far = np.take_along_axis(d2, idx[..., None], -1)[..., 0] > vcfg.max_color_dist**2
  return np.where(far, -1, idx).astype(np.int8)


def _components(labels: np.ndarray, cfg: WorldConfig, vcfg: VerifierConfig) -> list[Detection]:
  """Objects and malformed components of one label map int8[H, W]; sorted (colour, cy, cx)."""
  names, background = cfg.color_names, len(cfg.color_names)
  templates = _templates(cfg)
  out = []
  for ci in np.unique(labels):
    if ci == background:
      continue
    color = None if ci < 0 else names[ci]
    comps, _ = ndimage.label(labels == ci, structure=_EIGHT_CONNECTED)
    for j, sl in enumerate(ndimage.find_objects(comps), 1):
      crop = comps[sl] == j
      area = int(crop.sum())
      if area < vcfg.min_area:
        continue  # a speck: judged as background (see the module docstring)
      y0, x0, y1, x1 = sl[0].start, sl[1].start, sl[0].stop, sl[1].stop
      best, miss = None, None
      if color is not None:
        for t in templates.get(crop.shape, ()):
          m = int(np.count_nonzero(crop != t.mask))
          if miss is None or m < miss:
            best, miss = t, m
      common = dict(
          color=color, cx=(x0 + x1) / 2, cy=(y0 + y1) / 2, area=area, bbox=(int(y0), int(x0), int(y1), int(x1))
      )
      where = f"{y1 - y0}x{x1 - x0} px at (x={x0}, y={y0})"
      if best is not None and miss <= vcfg.shape_tolerance:
        out.append(Detection(best.shape, size=best.size, mismatch=miss, **common))
      elif color is None:
        out.append(Detection(None, reason=f"malformed: {area} off-palette px, {where}", **common))
      elif best is None:
        out.append(
            Detection(
                None,
                reason=f"malformed: {color} component of {area} px, {where}: " "no world shape has this extent",
                **common,
            )
        )
      else:
        out.append(
            Detection(
                None,
                mismatch=miss,
                reason=(
                    f"malformed: {color} component of {area} px, {where}: {miss} px off a "
                    f"{best.size} px {best.shape}"
                ),
                **common,
            )
        )
  return sorted(out, key=lambda d: (d.color or "~", d.cy, d.cx))


def _check_canvas(images: np.ndarray, cfg: WorldConfig, name: str) -> None:
  if images.shape[1:3] != (cfg.canvas, cfg.canvas):
    raise ValueError(
        f"reward {name!r}: images are {images.shape[1]}x{images.shape[2]}, " f"the world's canvas is {cfg.canvas}"
    )


def detect(
    image: np.ndarray, cfg: WorldConfig = WorldConfig(), vcfg: VerifierConfig = VerifierConfig()
) -> list[Detection]:
  """Objects and malformed components in one image.

  Args:
    image: uint8[H, W, 3].

  Returns:
    Detections sorted by (colour, cy, cx); malformed ones have ``shape=None``.
  """
  image = np.asarray(image)
  return _components(_pixel_labels(image[None], cfg, vcfg)[0], cfg, vcfg)


def judge(
    meta: PromptMeta,
    dets: Sequence[Detection],
    cfg: WorldConfig = WorldConfig(),
    vcfg: VerifierConfig = VerifierConfig(),
) -> Judgement:
  """Strict and dense scores of one image's detections against a prompt."""
  objects = [d for d in dets if not d.malformed]
  junk = [d for d in dets if d.malformed]
  rec = grammar.geneval_metadata(meta)
  found: dict[str, list[geneval.DetectedObject]] = {}
  for d in objects:
    found.setdefault(d.shape, []).append(geneval.DetectedObject(d.box, 1.0, d.color))
  verdict = geneval.evaluate(found, rec, ties="adversarial")
  include = rec["include"]

  def could_hold(j: Detection, clause: dict) -> bool:
    return j.area >= _min_object_area(cfg, clause["class"], vcfg.shape_tolerance)

  def spoiled(c: geneval.Check) -> bool:
    """Whether some malformed component could hide an object that fails check ``c``."""
    if c.kind == "count":
      return False  # hidden objects never help a count
    if c.kind == "exclude":
      return any(could_hold(j, rec["exclude"][c.clause]) for j in junk)
    own = include[c.clause]
    if c.kind == "color":
      return any(
          j.color != own.get("color") and could_hold(j, own) and geneval.pool_admits(rec, c.clause, j.color)
          for j in junk
      )
    tgt = include[c.target]
    return any(
        (could_hold(j, own) and geneval.pool_admits(rec, c.clause, j.color))
        or (could_hold(j, tgt) and geneval.pool_admits(rec, c.target, j.color))
        for j in junk
    )

  credits = [0.0 if junk and spoiled(c) else c.credit for c in verdict.checks]
  p = float(np.mean(credits)) if credits else 1.0
  area = sum(j.area for j in junk)
  dense = p * 0.5 ** (area / vcfg.junk_half_life)
  strict = float(verdict.correct and not junk)
  reason = "\n".join([verdict.reason] * bool(verdict.reason) + [j.reason for j in junk])
  return Judgement(strict, float(dense), verdict, len(junk), area, reason)


def score(
    meta: PromptMeta,
    dets: Sequence[Detection],
    cfg: WorldConfig = WorldConfig(),
    vcfg: VerifierConfig = VerifierConfig(),
) -> tuple[float, float]:
  """(strict, dense) of one image's detections; strict in {0., 1.}, dense in [0, 1]."""
  j = judge(meta, dets, cfg, vcfg)
  return j.strict, j.dense


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
    raise ValueError(f"ShapeEval prompt {text!r}: unknown word(s) {unknown}; " f"the vocabulary is {sorted(vocab)}")
  meta = table.get(" ".join(words))
  if meta is None:
    raise ValueError(
        f"ShapeEval prompt {text!r} uses known words but is not a sentence of the "
        "grammar (see htgrpo_jax.worlds.shapeeval.grammar)"
    )
  return meta


class ShapeEvalReward:
  """The verifier as a ``RewardFn``.

  ``reward(prompts, images, meta=None) -> float32[B]``; ``meta`` is an optional list of
  ``PromptMeta`` (or their JSON), otherwise each prompt is parsed.

  Args:
    cfg: the world (palette, canvas, shapes, sizes).
    mode: 'strict' (GenEval 0/1, nothing malformed) or 'dense' (partial score for RL).
    on_invalid: 'raise' (default) or 'zero': score prompts that do not parse as 0.
    vcfg: detector settings.
  """

  def __init__(
      self,
      cfg: WorldConfig = WorldConfig(),
      mode: str = "strict",
      on_invalid: str = "raise",
      vcfg: VerifierConfig = VerifierConfig(),
  ):
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

  def details(
      self, prompts: Sequence[str], images: np.ndarray, meta: Sequence[Any] | None = None
  ) -> list[dict[str, Any]]:
    """Per image, for logging and debugging.

    Returns:
      One dict per image: 'prompt', 'meta' (PromptMeta or None when it did not parse),
      'detections' (list of ``Detection``, malformed ones included), 'strict', 'dense',
      'malformed' (number of malformed components: the "hacking watch"), 'malformed_area' (px),
      'reason' (why it failed; '' when strict is 1) and 'verdict' (``geneval.Verdict`` or None).
    """
    images = check_images(self.name, prompts, images)
    _check_canvas(images, self.cfg, self.name)
    metas = self._metas(prompts, meta)
    labels = _pixel_labels(images, self.cfg, self.vcfg)
    out = []
    for p, m, lab in zip(prompts, metas, labels):
      dets = _components(lab, self.cfg, self.vcfg)
      junk = [d for d in dets if d.malformed]
      if m is None:
        out.append(
            dict(
                prompt=p,
                meta=None,
                detections=dets,
                strict=0.0,
                dense=0.0,
                malformed=len(junk),
                malformed_area=sum(d.area for d in junk),
                reason="prompt does not parse",
                verdict=None,
            )
        )
        continue
      j = judge(m, dets, self.cfg, self.vcfg)
      out.append(
          dict(
              prompt=p,
              meta=m,
              detections=dets,
              strict=j.strict,
              dense=j.dense,
              malformed=j.malformed,
              malformed_area=j.malformed_area,
              reason=j.reason,
              verdict=j.verdict,
          )
      )
    return out

  def __call__(
      self, prompts: Sequence[str], images: np.ndarray, meta: Sequence[Any] | None = None, **unused: Any
  ) -> np.ndarray:
    return np.array([r[self.mode] for r in self.details(prompts, images, meta)], np.float32)
