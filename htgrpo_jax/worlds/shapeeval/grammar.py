"""The ShapeEval prompt grammar: GenEval's six tags over shapes, colours and relations.

Every prompt carries ``PromptMeta`` (tag, required objects with shape / colour / count, relation)
which the verifier scores against and from which ground-truth scenes are drawn (``scene_for``);
``geneval_metadata`` writes it as GenEval's metadata record, the form ``rewards.geneval`` judges.

Phrasing follows GenEval ("a photo of ..."):
  single_object  a photo of a circle
  two_object     a photo of a circle and a square
  counting       a photo of three triangles
  colors         a photo of a red circle
  position       a photo of a blue circle left of a green triangle
  color_attr     a photo of a red circle and a blue square

Train / held-out splits are separated by composition, so the two sets of prompt strings are
disjoint: held-out colour-shape pairs (colors, color_attr), held-out (shape, relation, shape)
triples (position), held-out (shape, count) pairs (counting), held-out orderings (two_object).
single_object has nothing to hold out (3 prompts), so it is evaluation-only: the policy learns
"a circle" from the compositional prompts that contain it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Iterable, Sequence

import numpy as np

from htgrpo_jax.worlds.shapeeval import scenes
from htgrpo_jax.worlds.shapeeval.scenes import RELATIONS, Scene, WorldConfig

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
SPLITS = ("train", "eval")

# Held-out compositions (fixed so every run and every machine agrees on the split).
HELDOUT_COLOR_SHAPE = frozenset(
    {
        ("red", "triangle"),
        ("green", "circle"),
        ("blue", "square"),
        ("yellow", "circle"),
        ("purple", "square"),
        ("orange", "triangle"),
    }
)
HELDOUT_COUNTS = frozenset({("circle", 3), ("square", 4), ("triangle", 2)})
HELDOUT_RELATIONS = frozenset(
    {
        ("circle", "left of", "square"),
        ("square", "above", "triangle"),
        ("triangle", "right of", "circle"),
        ("circle", "below", "circle"),
        ("triangle", "left of", "triangle"),
        ("square", "below", "circle"),
        ("square", "right of", "square"),
        ("triangle", "above", "square"),
        ("circle", "above", "triangle"),
    }
)


@dataclasses.dataclass(frozen=True)
class ObjectReq:
  """A required object: ``count`` instances of ``shape`` (of ``color`` when not None)."""

  shape: str
  color: str | None = None
  count: int = 1


@dataclasses.dataclass(frozen=True)
class PromptMeta:
  """What a prompt asks for. ``relation`` (if any) relates objects[0] to objects[1]."""

  tag: str
  objects: tuple[ObjectReq, ...]
  relation: str | None = None

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @staticmethod
  def from_json(s: str | bytes) -> "PromptMeta":
    d = json.loads(s)
    return PromptMeta(d["tag"], tuple(ObjectReq(**o) for o in d["objects"]), d["relation"])


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str
  meta: PromptMeta


def _a(color: str | None, shape: str) -> str:
  word = f"{color} {shape}" if color else shape
  return ("an " if word[0] in "aeiou" else "a ") + word


def describe(meta: PromptMeta) -> str:
  """The caption of a prompt's metadata."""
  o = meta.objects
  if meta.tag == "counting":
    return f"a photo of {NUMBER_WORDS[o[0].count]} {PLURALS[o[0].shape]}"
  if meta.tag == "position":
    return f"a photo of {_a(o[0].color, o[0].shape)} {meta.relation} {_a(o[1].color, o[1].shape)}"
  return "a photo of " + " and ".join(_a(x.color, x.shape) for x in o)


def split_of(meta: PromptMeta) -> str:
  """'train' or 'eval' for a prompt, by the held-out compositions it contains."""
  o = meta.objects
  if meta.tag == "single_object":
    return "eval"
  if meta.tag == "two_object":
    return "train" if o[0].shape < o[1].shape else "eval"
  if meta.tag == "counting":
    return "eval" if (o[0].shape, o[0].count) in HELDOUT_COUNTS else "train"
  if meta.tag in ("colors", "color_attr"):
    return "eval" if any((x.color, x.shape) in HELDOUT_COLOR_SHAPE for x in o) else "train"
  if meta.tag == "position":
    return "eval" if (o[0].shape, meta.relation, o[1].shape) in HELDOUT_RELATIONS else "train"
  raise ValueError(f"unknown tag {meta.tag!r}; known {TAGS}")


def all_prompts(cfg: WorldConfig = WorldConfig()) -> list[Prompt]:
  """Every prompt of the grammar, in a fixed order."""
  shapes, colors = cfg.shapes, cfg.color_names
  metas: list[PromptMeta] = []
  metas += [PromptMeta("single_object", (ObjectReq(s),)) for s in shapes]
  metas += [PromptMeta("two_object", (ObjectReq(a), ObjectReq(b))) for a, b in itertools.permutations(shapes, 2)]
  metas += [PromptMeta("counting", (ObjectReq(s, None, n),)) for s in shapes for n in NUMBER_WORDS]
  metas += [PromptMeta("colors", (ObjectReq(s, c),)) for s in shapes for c in colors]
  pairs = [(c, s) for s in shapes for c in colors]
  metas += [
      PromptMeta("position", (ObjectReq(a[1], a[0]), ObjectReq(b[1], b[0])), r)
      for r in RELATIONS
      for a in pairs
      for b in pairs
      if a != b
  ]
  metas += [
      PromptMeta("color_attr", (ObjectReq(a[1], a[0]), ObjectReq(b[1], b[0])))
      for a in pairs
      for b in pairs
      if a[1] != b[1] and a[0] != b[0]
  ]
  return [Prompt(describe(m), m) for m in metas]


def split_prompts(split: str, cfg: WorldConfig = WorldConfig()) -> list[Prompt]:
  """All prompts of ``split`` ('train' or 'eval')."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {SPLITS}")
  return [p for p in all_prompts(cfg) if split_of(p.meta) == split]


def balanced_prompts(split: str, n: int, seed: int = 0, cfg: WorldConfig = WorldConfig()) -> list[Prompt]:
  """``n`` prompts of ``split`` balanced over the tags present (round-robin, shuffled per tag).

  Small tags repeat their prompts, as GenEval repeats prompts across samples.
  """
  rng = np.random.default_rng(seed)
  by_tag = {t: [p for p in split_prompts(split, cfg) if p.meta.tag == t] for t in TAGS}
  by_tag = {t: v for t, v in by_tag.items() if v}
  orders = {t: list(rng.permutation(len(v))) for t, v in by_tag.items()}
  out = []
  tags = list(by_tag)
  for i in range(n):
    t = tags[i % len(tags)]
    k = (i // len(tags)) % len(by_tag[t])
    out.append(by_tag[t][orders[t][k]])
  return out


def geneval_metadata(meta: PromptMeta) -> dict:
  """GenEval's metadata record of a prompt (the input of ``rewards.geneval.evaluate``).

  Shapes are the classes. Counting is include N + exclude N+1 (exactly N); a position prompt
  "A rel B" lists B first and puts ``position: [rel, 0]`` on A, as GenEval's own records do.
  """

  def clause(o: ObjectReq) -> dict:
    return {"class": o.shape, "count": o.count, **({"color": o.color} if o.color else {})}

  rec: dict = {"tag": meta.tag, "include": [clause(o) for o in meta.objects], "exclude": [], "prompt": describe(meta)}
  if meta.tag == "counting":
    o = meta.objects[0]
    rec["exclude"] = [{"class": o.shape, "count": o.count + 1}]
  if meta.relation is not None:
    a, b = (clause(o) for o in meta.objects[:2])
    rec["include"] = [b, {**a, "position": [meta.relation, 0]}] + rec["include"][2:]
  return rec


def scene_for(meta: PromptMeta, rng: np.random.Generator, cfg: WorldConfig = WorldConfig()) -> Scene:
  """A ground-truth scene satisfying ``meta`` (unspecified colours drawn at random).

  Position scenes satisfy GenEval's rule with ``cfg.relation_margin`` to spare
  (``scenes.relation_holds``).
  """
  spec = [(o.shape, o.color) for o in meta.objects for _ in range(o.count)]
  return scenes.sample_scene(rng, spec, cfg, relation=meta.relation)


def vocabulary(cfg: WorldConfig = WorldConfig()) -> list[str]:
  """Every word the grammar can emit, sorted."""
  words = {"a", "an", "photo", "of", "and"}
  words |= set(cfg.shapes) | {PLURALS[s] for s in cfg.shapes} | set(cfg.color_names)
  words |= set(NUMBER_WORDS.values())
  for r in RELATIONS:
    words |= set(r.split())
  return sorted(words)


def tags_of(prompts: Iterable[Prompt]) -> list[str]:
  return [p.meta.tag for p in prompts]


def metas_of(prompts: Sequence[Prompt]) -> list[PromptMeta]:
  return [p.meta for p in prompts]
