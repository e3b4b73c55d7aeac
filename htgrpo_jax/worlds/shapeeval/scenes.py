"""ShapeEval scenes: coloured circles, squares and triangles on a plain background.

A scene is a tuple of objects, each a shape of one colour drawn inside a square box. By default
boxes snap to the VQ tokenizer's patch grid (4 px) so every image patch is one of a few dozen
exact patterns and a 128-entry k-means codebook reconstructs scenes losslessly; ``snap=False``
with a larger canvas gives the harder unaligned variant (objects at any pixel offset).

Objects never overlap and keep ``min_gap`` px of background between boxes, so ground-truth scenes
are unambiguous for the pixel verifier (two touching same-colour objects would merge into one
connected component, exactly as they would for any colour-segmentation detector).

Relations ("A left of B") are GenEval's (``rewards.geneval.relative_position``) on the objects'
footprint boxes, the tight boxes of their drawn pixels, which is what the verifier detects; the
sampler asks for ``relation_margin`` beyond GenEval's 0.5 so ground truth passes robustly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import numpy as np

from htgrpo_jax.rewards import geneval

SHAPES = ("circle", "square", "triangle")
# Saturated, mutually distant RGB colours (min pairwise L2 distance > 90) so nearest-colour
# segmentation of decoded pixels is unambiguous.
COLORS: Mapping[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 130, 20),
}
BACKGROUND = (16, 16, 16)
RELATIONS = ("left of", "right of", "above", "below")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Geometry of the ShapeEval world.

  Attributes:
    canvas: image side in px (square images, H = W = canvas).
    patch: VQ patch side in px; the token grid is (canvas // patch)^2.
    sizes: object box sides in px to draw from (multiples of ``patch`` when ``snap``).
    snap: place boxes on the patch grid (the default, aligned world).
    min_gap: background px kept between any two boxes.
    relation_margin: a requested relation must hold under GenEval's rule with this margin: its
      ``geneval.relation_strength`` (> 0.5 means it holds) must reach 0.5 + margin, on the
      footprint boxes and on the full boxes alike. 0.1 keeps ground truth passing when box edges
      move by a few pixels (measured: one box edge moved by 1 px changes the strength of a
      sampled scene by at most 0.025).
    shapes: shape vocabulary.
    colors: colour name -> RGB.
    background: background RGB.
  """

  canvas: int = 32
  patch: int = 4
  sizes: tuple[int, ...] = (8, 12)
  snap: bool = True
  min_gap: int = 4
  relation_margin: float = 0.1
  shapes: tuple[str, ...] = SHAPES
  colors: tuple[tuple[str, tuple[int, int, int]], ...] = tuple(COLORS.items())
  background: tuple[int, int, int] = BACKGROUND

  def __post_init__(self):
    if self.canvas % self.patch:
      raise ValueError(f"WorldConfig.canvas={self.canvas} must be a multiple of patch={self.patch}")
    if not self.sizes or max(self.sizes) > self.canvas:
      raise ValueError(f"WorldConfig.sizes={self.sizes} must be non-empty and <= canvas")
    if self.snap and any(s % self.patch for s in self.sizes):
      raise ValueError(f"WorldConfig.sizes={self.sizes} must be multiples of patch={self.patch} " "when snap=True")
    if len(self.colors) < 2 or len(set(dict(self.colors))) != len(self.colors):
      raise ValueError("WorldConfig.colors needs >= 2 distinct names")
    if not 0 <= self.relation_margin < 0.5:
      raise ValueError(f"WorldConfig.relation_margin={self.relation_margin} must be in [0, 0.5)")
    bad = set(self.shapes) - set(SHAPES)
    if bad:
      raise ValueError(f"WorldConfig.shapes: unknown shapes {sorted(bad)}; known {SHAPES}")

  @property
  def grid(self) -> int:
    """Tokens per side."""
    return self.canvas // self.patch

  @property
  def num_tokens(self) -> int:
    return self.grid * self.grid

  @property
  def color_names(self) -> tuple[str, ...]:
    return tuple(n for n, _ in self.colors)

  def rgb(self, color: str) -> tuple[int, int, int]:
    table = dict(self.colors)
    if color not in table:
      raise ValueError(f"colour {color!r} is not in the world's colours {self.color_names}")
    return table[color]


def unaligned_config(canvas: int = 48) -> WorldConfig:
  """The harder variant: objects at arbitrary pixel offsets on a larger canvas."""
  return WorldConfig(canvas=canvas, sizes=(10, 12), snap=False, min_gap=2)


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  """One object: ``shape`` of ``color`` in the box [y, y+size) x [x, x+size) (px)."""

  shape: str
  color: str
  x: int
  y: int
  size: int

  @property
  def center(self) -> tuple[float, float]:
    """(cx, cy) of the box in px."""
    return self.x + self.size / 2, self.y + self.size / 2

  @property
  def box(self) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the full box in px (x1, y1 exclusive)."""
    return self.x, self.y, self.x + self.size, self.y + self.size

  @property
  def footprint_box(self) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the drawn pixels' tight box in px (what a detector sees)."""
    y0, x0, y1, x1 = footprint_extent(self.shape, self.size)
    return self.x + x0, self.y + y0, self.x + x1, self.y + y1


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[ShapeObject, ...]


@functools.lru_cache(maxsize=64)
def shape_mask(shape: str, size: int) -> np.ndarray:
  """bool[size, size] footprint of a shape in its box (pixel centres tested against the shape).

  Cached and read-only: every render of a shape at a size reuses one array.
  """
  m = _shape_mask(shape, size)
  m.flags.writeable = False
  return m


@functools.lru_cache(maxsize=64)
def footprint_extent(shape: str, size: int) -> tuple[int, int, int, int]:
  """(y0, x0, y1, x1) of ``shape_mask(shape, size)``'s True pixels inside its box (exclusive).

  E.g. a triangle's apex row is empty, so its footprint starts one row below its box.
  """
  m = shape_mask(shape, size)
  rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
  return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _shape_mask(shape: str, size: int) -> np.ndarray:
  c = (np.arange(size) + 0.5) / size  # pixel centres in [0, 1]
  yy, xx = np.meshgrid(c, c, indexing="ij")
  if shape == "square":
    return np.ones((size, size), bool)
  if shape == "circle":
    return (xx - 0.5) ** 2 + (yy - 0.5) ** 2 <= 0.25
  if shape == "triangle":  # apex at the top centre, base on the bottom edge
    return np.abs(xx - 0.5) <= 0.5 * yy
  raise ValueError(f"shape {shape!r} is not one of {SHAPES}")


def render(scene: Scene, cfg: WorldConfig = WorldConfig()) -> np.ndarray:
  """Draws a scene.

  Returns:
    uint8[H, W, 3] with H = W = cfg.canvas.
  """
  img = np.empty((cfg.canvas, cfg.canvas, 3), np.uint8)
  img[:] = cfg.background
  for o in scene.objects:
    if o.x < 0 or o.y < 0 or o.x + o.size > cfg.canvas or o.y + o.size > cfg.canvas:
      raise ValueError(f"object {o} leaves the {cfg.canvas}px canvas")
    m = shape_mask(o.shape, o.size)
    img[o.y : o.y + o.size, o.x : o.x + o.size][m] = cfg.rgb(o.color)
  return img


def render_batch(scenes: Sequence[Scene], cfg: WorldConfig = WorldConfig()) -> np.ndarray:
  """uint8[B, H, W, 3]."""
  return np.stack([render(s, cfg) for s in scenes]) if scenes else np.zeros((0, cfg.canvas, cfg.canvas, 3), np.uint8)


def relation_holds(a: ShapeObject, b: ShapeObject, relation: str, margin: float = 0.0) -> bool:
  """Whether ``a`` stands ``relation`` ``b`` under GenEval's rule, with ``margin`` to spare.

  margin=0 is GenEval's rule exactly on the footprint boxes (what the verifier judges); a
  positive margin asks for ``geneval.relation_strength`` >= 0.5 + margin on the footprint boxes
  AND on the full boxes, so the relation survives small box errors.
  """
  if relation not in RELATIONS:
    raise ValueError(f"relation {relation!r} is not one of {RELATIONS}")
  if margin == 0:
    return relation in geneval.relative_position(a.footprint_box, b.footprint_box)
  return all(
      geneval.relation_strength(p, q, relation) >= 0.5 + margin
      for p, q in ((a.footprint_box, b.footprint_box), (a.box, b.box))
  )


def _boxes_clear(a: ShapeObject, b: ShapeObject, gap: int) -> bool:
  return (
      a.x + a.size + gap <= b.x or b.x + b.size + gap <= a.x or a.y + a.size + gap <= b.y or b.y + b.size + gap <= a.y
  )


def sample_scene(
    rng: np.random.Generator,
    spec: Sequence[tuple[str | None, str | None]],
    cfg: WorldConfig = WorldConfig(),
    relation: str | None = None,
    max_tries: int = 2000,
) -> Scene:
  """Samples a scene with one object per ``spec`` entry.

  Args:
    rng: numpy Generator.
    spec: (shape, colour) per object; ``None`` picks uniformly from the world's vocabulary.
    cfg: world geometry.
    relation: if given, object 0 must stand ``relation`` object 1 (e.g. "left of") under
      GenEval's rule with ``cfg.relation_margin`` to spare (``relation_holds``).
    max_tries: rejection-sampling budget for the whole scene.

  Returns:
    A ``Scene`` whose objects do not overlap and keep ``cfg.min_gap`` px between boxes.
  """
  if relation is not None and len(spec) < 2:
    raise ValueError(f"relation {relation!r} needs >= 2 objects, spec has {len(spec)}")
  if relation is not None and relation not in RELATIONS:
    raise ValueError(f"relation {relation!r} is not one of {RELATIONS}")
  step = cfg.patch if cfg.snap else 1
  resolved = []
  for shape, color in spec:
    shape = shape if shape is not None else cfg.shapes[rng.integers(len(cfg.shapes))]
    color = color if color is not None else cfg.color_names[rng.integers(len(cfg.colors))]
    if shape not in cfg.shapes:
      raise ValueError(f"spec shape {shape!r} is not one of {cfg.shapes}")
    cfg.rgb(color)
    resolved.append((shape, color))
  for _ in range(max_tries):
    objs: list[ShapeObject] = []
    for shape, color in resolved:
      size = int(cfg.sizes[rng.integers(len(cfg.sizes))])
      slots = (cfg.canvas - size) // step + 1
      o = ShapeObject(shape, color, int(rng.integers(slots)) * step, int(rng.integers(slots)) * step, size)
      if not all(_boxes_clear(o, p, cfg.min_gap) for p in objs):
        break
      objs.append(o)
    else:
      if relation is None or relation_holds(objs[0], objs[1], relation, cfg.relation_margin):
        return Scene(tuple(objs))
  raise ValueError(
      f"could not place {len(spec)} objects on a {cfg.canvas}px canvas "
      f"in {max_tries} tries (spec={list(spec)}, relation={relation})"
  )
