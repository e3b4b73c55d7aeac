"""GenEval's decision rules as pure functions: detections + a metadata record -> a verdict.

GenEval (Ghosh et al., 2023) scores a text-to-image model with an object detector (Mask2Former
there; any detector here: OWLv2, a pixel verifier, ...) and a colour classifier (CLIP there). This
module is the part after detection, so that "GenEval-style" means one thing in this project: the
ShapeEval pixel verifier (``worlds/shapeeval/verifier.py``) feeds it exact detections, a real-image reward
can feed it OWLv2/CLIP outputs.

Inputs
  detections  class name -> list of objects; an object is a ``DetectedObject``, a dict with
              ``box`` (x0, y0, x1, y1) in pixels (image y grows downwards), ``score`` and
              optionally ``color`` (one of ``COLORS``) or ``color_probs`` (over ``COLORS``, a
              sequence in that order or a {colour: p} mapping; the top one is the colour), or an
              mmdet row (x0, y0, x1, y1, score).
  metadata    a GenEval record: ``{"tag", "include": [{"class", "count", "color"?,
              "position"?: [relation, target_include_index]}], "exclude": [{"class", "count"}],
              "prompt"}``. A position clause sits on the include entry that is related TO the
              target ("a bus right of a train": include [{train, 1}, {bus, 1, position:
              ["right of", 0]}]).

The published rules (``variant='geneval'``, the default)
  * per class, objects with score > 0.3 (> 0.9 when the tag is "counting") are kept, highest
    scores first, at most 16;
  * include clauses are ANDed, each "at least ``count``": the class needs >= count kept objects;
    colour and position are judged on the top-``count`` objects only: all of them must have the
    asked colour; every one of them must stand in the asked relation to every matched object of
    the target clause (a target clause that failed fails the relation: "no target");
  * an exclude clause fails when its class has >= ``count`` kept objects (counting prompts are
    include N + exclude N+1, i.e. exactly N);
  * ``relative_position``: box centres and sizes, offset = centre_A - centre_B,
    revised = max(|offset| - 0.1 * (dim_A + dim_B), 0) * sign(offset); no relation when every
    |revised| < 1e-3; else (dx, dy) = revised / ||offset||: "left of" dx < -0.5, "right of"
    dx > 0.5, "above" dy < -0.5, "below" dy > 0.5. Diagonal placements can hold two relations or
    none;
  * a benchmark's overall score is the mean over its tags of the per-tag accuracy
    (``summary_scores``).

Ties (``ties=``). Equal scores make "top-count" ambiguous (GenEval takes whatever order
``np.argsort`` leaves).
  'first'        stable: among equal scores the object listed first ranks first (GenEval's
                 ``np.argsort(scores)[::-1]`` ranks the last-listed first on small arrays; pass
                 the list reversed to mimic it).
  'adversarial'  a check passes only if it passes for EVERY ordering of tied objects (including
                 which tied objects survive the 16 cap). The colour check then needs every object
                 that some ordering could put in the top-count to have the asked colour, and the
                 position check every such pair. This is what the ShapeEval verifier uses: all its
                 detections are exact (score 1.0), so any extra object of an asked class is "tied"
                 with the intended one.

Same-class clauses of different colours (ShapeEval's reading; GenEval's own metadata never has
them: as published, every clause of a class takes the same top-count objects, so "a red circle
below a green circle" could never pass). When include clauses of one class ask for different
colours, each colour clause's candidates are the class's objects of its own colour plus the
objects whose colour NO clause of that class asks for; objects of a colour that a sibling clause
claims belong to that sibling only. Uncoloured clauses keep all objects of the class. Hence,
under exact ties, one object of an unclaimed colour fails the colour check of every colour clause
of its class: drawing "a red circle" as a red, a blue and a green circle fails (colour hedging),
while "a red circle below a green circle" is judged on the red circles vs. the green circles.
For metadata whose clauses of a class all ask the same colour (all of GenEval's), this is exactly
the published rule.

Partial credit (``Verdict.dense``, in [0, 1], equal to 1 exactly when ``correct``). One credit
per check, averaged:
  count     min(found, count) / count (under adversarial ties: the fewest any ordering keeps);
  colour    share of the top-count with the asked colour (adversarial: the worst ordering's
            share); 0 when the count check failed (GenEval never looks at the colour then);
  position  1 / 0, and 0 unless the clause's own count and colour checks passed;
  exclude   1 / 0, and 0 while the class has no object at all although an include clause asks
            for it: restraint is credited only when something was drawn, otherwise a blank image
            would earn half of every counting prompt.
``variant='flow_grpo'`` is Flow-GRPO's dense GenEval reward: all objects of the class are used
(no top-count), strict means exact counts (count == found) and the exact number of objects of the
asked colour; count credit 1 - |count - found| / count clipped at 0, colour credit the same on
the objects of the asked colour (0 when the count is not exact), position 1 / 0. Two departures
from Flow-GRPO's code, both so that every check adds exactly one term: its position loop appends
1.0 even after a failing pair and a colour failure skips the position term; here a failing
position is one 0 and a skipped one is a 0. Exclude clauses are checked in both variants (with
exact counts they are redundant for GenEval's metadata) with the exclude credit above.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
SCORE_THRESHOLD = 0.3
COUNTING_SCORE_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1
VARIANTS = ("geneval", "flow_grpo")
TIES = ("first", "adversarial")


@dataclasses.dataclass(frozen=True)
class DetectedObject:
  """One detection.

  Attributes:
    box: (x0, y0, x1, y1) in pixels, x0 <= x1, y0 <= y1, image y downwards.
    score: detector confidence.
    color: colour name or None when unknown. A CLIP classifier gives one of ``COLORS``; exact
      detectors (the ShapeEval verifier) may use their world's names, matched by string.
    color_probs: probabilities over ``COLORS`` (tuple in that order), used when ``color`` is None.
  """

  box: tuple[float, float, float, float]
  score: float = 1.0
  color: str | None = None
  color_probs: tuple[float, ...] | None = None

  @property
  def top_color(self) -> str | None:
    """``color``, else the most probable colour of ``color_probs``, else None."""
    if self.color is not None:
      return self.color
    if self.color_probs is None:
      return None
    return COLORS[max(range(len(COLORS)), key=lambda i: self.color_probs[i])]


@dataclasses.dataclass(frozen=True)
class Check:
  """One GenEval check of a verdict.

  Attributes:
    kind: 'count', 'color', 'position' (of ``include[clause]``) or 'exclude' (``exclude[clause]``).
    clause: index into the metadata's include (or exclude) list.
    passed: the check's outcome under the rules of the verdict.
    credit: its partial credit in [0, 1] (1.0 iff passed).
    target: for 'position', the target clause index; else -1.
  """

  kind: str
  clause: int
  passed: bool
  credit: float
  target: int = -1


@dataclasses.dataclass(frozen=True)
class Verdict:
  """GenEval's decision on one image.

  Attributes:
    correct: every check passed.
    strict: 1.0 if correct else 0.0.
    dense: mean partial credit of the checks, in [0, 1]; 1.0 iff correct.
    reason: GenEval's failure reasons, one per line ('' when correct).
    checks: the individual checks (what ``dense`` averages).
  """

  correct: bool
  strict: float
  dense: float
  reason: str
  checks: tuple[Check, ...] = ()


# --------------------------------------------------------------------------------------------
# Geometry.


def _centre_dims(box: Sequence[float]) -> tuple[float, float, float, float]:
  x0, y0, x1, y1 = (float(v) for v in box[:4])
  return (x0 + x1) / 2, (y0 + y1) / 2, abs(x1 - x0), abs(y1 - y0)


def direction(
    box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD
) -> tuple[float, float] | None:
  """GenEval's normalised revised offset of box A relative to box B.

  Returns:
    (dx, dy) = revised / ||offset|| (see the module docstring), or None when A and B are too
    close for any relation (every |revised| < 1e-3).
  """
  ax, ay, aw, ah = _centre_dims(box_a)
  bx, by, bw, bh = _centre_dims(box_b)
  ox, oy = ax - bx, ay - by
  rx = max(abs(ox) - threshold * (aw + bw), 0.0) * _sign(ox)
  ry = max(abs(oy) - threshold * (ah + bh), 0.0) * _sign(oy)
  if abs(rx) < 1e-3 and abs(ry) < 1e-3:
    return None
  norm = math.hypot(ox, oy)  # > 0 here: a non-zero revised offset needs a non-zero offset
  return rx / norm, ry / norm


def _sign(v: float) -> float:
  return (v > 0) - (v < 0)


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD
) -> frozenset[str]:
  """The relations in which box A stands to box B under GenEval's rule (possibly none or two)."""
  d = direction(box_a, box_b, threshold)
  if d is None:
    return frozenset()
  dx, dy = d
  rel = set()
  if dx < -0.5:
    rel.add("left of")
  if dx > 0.5:
    rel.add("right of")
  if dy < -0.5:
    rel.add("above")
  if dy > 0.5:
    rel.add("below")
  return frozenset(rel)


def relation_strength(
    box_a: Sequence[float], box_b: Sequence[float], relation: str, threshold: float = POSITION_THRESHOLD
) -> float:
  """How far A stands ``relation`` B: the component of ``direction`` along the relation.

  GenEval's rule holds iff the strength exceeds 0.5; scene generators ask for 0.5 + a margin so
  that ground truth passes robustly. In [-1, 1]; 0 when no relation is defined.
  """
  if relation not in RELATIONS:
    raise ValueError(f"relation {relation!r} is not one of {RELATIONS}")
  d = direction(box_a, box_b, threshold)
  if d is None:
    return 0.0
  dx, dy = d
  return {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]


# --------------------------------------------------------------------------------------------
# Inputs.


def as_object(obj: Any) -> DetectedObject:
  """A ``DetectedObject`` from a ``DetectedObject``, a dict or an mmdet row (x0, y0, x1, y1, s)."""
  if isinstance(obj, DetectedObject):
    o = obj
  elif isinstance(obj, Mapping):
    unknown = set(obj) - {"box", "score", "color", "color_probs"}
    if unknown or "box" not in obj:
      raise ValueError(
          f"detection {dict(obj)!r}: needs 'box' and only 'score', 'color', "
          f"'color_probs' besides it (unknown: {sorted(unknown)})"
      )
    probs = obj.get("color_probs")
    if isinstance(probs, Mapping):
      bad = set(probs) - set(COLORS)
      if bad:
        raise ValueError(f"detection color_probs: unknown colours {sorted(bad)}; GenEval's are " f"{COLORS}")
      probs = tuple(float(probs.get(c, 0.0)) for c in COLORS)
    o = DetectedObject(
        tuple(float(v) for v in obj["box"]),
        float(obj.get("score", 1.0)),
        obj.get("color"),
        None if probs is None else tuple(map(float, probs)),
    )
  else:
    row = [float(v) for v in obj]
    if len(row) != 5:
      raise ValueError(f"detection {obj!r}: expected an mmdet row (x0, y0, x1, y1, score)")
    o = DetectedObject(tuple(row[:4]), row[4])
  if len(o.box) != 4 or o.box[2] < o.box[0] or o.box[3] < o.box[1]:
    raise ValueError(f"detection box {o.box}: expected (x0, y0, x1, y1) with x0 <= x1, y0 <= y1")
  if o.color_probs is not None and len(o.color_probs) != len(COLORS):
    raise ValueError(
        f"detection color_probs has {len(o.color_probs)} entries; expected " f"{len(COLORS)} in the order {COLORS}"
    )
  return o


def _check_metadata(metadata: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
  include = [dict(r) for r in metadata.get("include", [])]
  exclude = [dict(r) for r in metadata.get("exclude", [])]
  for i, r in enumerate(include):
    if "class" not in r or not isinstance(r.get("count"), int) or r["count"] < 1:
      raise ValueError(f"metadata include[{i}] = {r!r}: needs 'class' and an int 'count' >= 1")
    if "position" in r:
      rel, target = r["position"]
      if rel not in RELATIONS or not isinstance(target, int) or not 0 <= target < i:
        raise ValueError(
            f"metadata include[{i}]: position {r['position']!r} needs a relation of "
            f"{RELATIONS} and an earlier include index"
        )
  for i, r in enumerate(exclude):
    if "class" not in r or not isinstance(r.get("count"), int) or r["count"] < 1:
      raise ValueError(f"metadata exclude[{i}] = {r!r}: needs 'class' and an int 'count' >= 1")
  return include, exclude


def pool_admits(metadata: Mapping[str, Any], clause: int, color: str | None) -> bool:
  """Whether an object of ``include[clause]``'s class with colour ``color`` is its candidate.

  Implements the same-class reading of the module docstring: False only when the clause asks for
  a colour and ``color`` is another colour that a sibling clause of the same class asks for.
  ``color=None`` (unknown) is admitted everywhere.
  """
  include, _ = _check_metadata(metadata)
  return _admits(include, clause, color)


def _admits(include: Sequence[Mapping[str, Any]], clause: int, color: str | None) -> bool:
  req = include[clause]
  own = req.get("color")
  if own is None or color is None or color == own:
    return True
  claimed = {r.get("color") for r in include if r["class"] == req["class"]}
  return color not in claimed


def keep(objects: Iterable[Any], threshold: float, max_objects: int = MAX_OBJECTS) -> list[DetectedObject]:
  """GenEval's per-class filter: score > threshold, highest first (stable), at most max_objects."""
  objs = [o for o in map(as_object, objects) if o.score > threshold]
  order = sorted(range(len(objs)), key=lambda i: -objs[i].score)
  return [objs[i] for i in order][:max_objects]


# --------------------------------------------------------------------------------------------
# The rules.


@dataclasses.dataclass
class _Clause:
  """Per include clause: the candidates and what the checks look at."""

  n: int  # number of candidates kept (the worst ordering's, under adversarial ties)
  top: list[DetectedObject]  # objects some ordering puts in the top-count (all, for flow_grpo)
  right: int  # objects of the asked colour in the top-count (worst ordering)
  colors: list[str | None]  # colours of ``top`` (for the reason)


def _ordered(objs: list[DetectedObject], rank) -> list[int]:
  """Indices of ``objs`` by score (descending), ties broken by ``rank(i)`` then list order."""
  return sorted(range(len(objs)), key=lambda i: (-objs[i].score, rank(i), i))


def _clause_view(
    objs: list[DetectedObject],
    in_pool: list[bool],
    color: str | None,
    count: int,
    variant: str,
    ties: str,
    max_objects: int,
) -> _Clause:
  """Candidates of one include clause among a class's thresholded objects ``objs`` (any order)."""
  right_col = [color is None or o.top_color == color for o in objs]
  if variant == "flow_grpo" or ties == "first":
    kept = _ordered(objs, lambda i: 0)[:max_objects]
    pool = [i for i in kept if in_pool[i]]
    top = pool if variant == "flow_grpo" else pool[:count]
    return _Clause(len(pool), [objs[i] for i in top], sum(right_col[i] for i in top), [objs[i].top_color for i in top])
  # Adversarial: each quantity is taken at the ordering of ties that is worst for it.
  # Fewest candidates kept: tied non-candidates of the class take the capped places first.
  kept = _ordered(objs, lambda i: in_pool[i])[:max_objects]
  n = sum(in_pool[i] for i in kept)
  # Fewest asked-colour objects in the top-count: wrong colours first, asked colour last.
  kept = _ordered(objs, lambda i: 2 if not in_pool[i] else (3 if right_col[i] else 1))[:max_objects]
  worst_top = [i for i in kept if in_pool[i]][:count]
  right = sum(right_col[i] for i in worst_top)
  # Every candidate some ordering can put in the top-count: it can survive the cap (score >= the
  # cap's score) and fewer than ``count`` candidates score strictly higher.
  scores = sorted((o.score for o in objs), reverse=True)
  cut = scores[max_objects - 1] if len(scores) > max_objects else -math.inf
  top = [
      i
      for i in range(len(objs))
      if in_pool[i]
      and objs[i].score >= cut
      and sum(in_pool[j] and objs[j].score > objs[i].score for j in range(len(objs))) < count
  ]
  top.sort(key=lambda i: (-objs[i].score, i))
  return _Clause(n, [objs[i] for i in top], right, [objs[i].top_color for i in top])


def evaluate(
    detections: Mapping[str, Iterable[Any]],
    metadata: Mapping[str, Any],
    *,
    variant: str = "geneval",
    ties: str = "first",
    threshold: float = SCORE_THRESHOLD,
    counting_threshold: float = COUNTING_SCORE_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    position_threshold: float = POSITION_THRESHOLD,
) -> Verdict:
  """GenEval's verdict on one image.

  Args:
    detections: class name -> objects (see the module docstring), in any order.
    metadata: a GenEval metadata record.
    variant: 'geneval' (the published rules) or 'flow_grpo' (exact counts, Flow-GRPO's credit).
    ties: 'first' or 'adversarial' (see the module docstring).
    threshold / counting_threshold: score thresholds (counting_threshold when tag == 'counting').
    max_objects: objects kept per class.
    position_threshold: the 0.1 of ``relative_position``.

  Returns:
    A ``Verdict``.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r}; expected one of {VARIANTS}")
  if ties not in TIES:
    raise ValueError(f"ties={ties!r}; expected one of {TIES}")
  include, exclude = _check_metadata(metadata)
  thr = counting_threshold if metadata.get("tag") == "counting" else threshold
  by_class = {c: [o for o in map(as_object, objs) if o.score > thr] for c, objs in detections.items()}
  exact = variant == "flow_grpo"
  checks: list[Check] = []
  reasons: list[str] = []
  matched: list[list[DetectedObject] | None] = []
  for i, req in enumerate(include):
    cls, count, color = req["class"], req["count"], req.get("color")
    objs = by_class.get(cls, [])
    view = _clause_view(
        objs, [_admits(include, i, o.top_color) for o in objs], color, count, variant, ties, max_objects
    )
    ok = view.n == count if exact else view.n >= count
    if exact:
      credit = max(0.0, 1.0 - abs(count - view.n) / count)
    else:
      credit = min(view.n, count) / count
    checks.append(Check("count", i, ok, 1.0 if ok else credit))
    if not ok:
      reasons.append(f"expected {cls}{'==' if exact else '>='}{count}, found {view.n}")
    matched_ok = ok
    if color is not None:
      if not ok:
        checks.append(Check("color", i, False, 0.0))
      else:
        good = view.right == count if exact else view.right >= count
        credit = max(0.0, 1.0 - abs(count - view.right) / count) if exact else view.right / count
        checks.append(Check("color", i, good, 1.0 if good else credit))
        if not good:
          found = view.colors
          names = [c for c in COLORS if c in found] + sorted({str(c) for c in found if c not in COLORS})
          tied = (
              f" of {len(view.top)} tie-ambiguous candidates"
              if ties == "adversarial" and not exact and len(view.top) > count
              else ""
          )
          reasons.append(
              f"expected {color} {cls}>={count}, found {view.right} {color}{tied}; and "
              + ", ".join(f"{[str(f) for f in found].count(c)} {c}" for c in names)
          )
          matched_ok = False
    if "position" in req:
      rel, target = req["position"]
      good = False
      if matched_ok:
        if matched[target] is None:
          reasons.append(f"no target for {cls} to be {rel}")
        else:
          good = True
          for a in view.top:
            for b in matched[target]:
              rels = relative_position(a.box, b.box, position_threshold)
              if rel not in rels:
                good = False
                reasons.append(f"expected {cls} {rel} target, found " f"{' and '.join(sorted(rels))} target")
                break
            if not good:
              break
      matched_ok = matched_ok and good
      checks.append(Check("position", i, good, float(good), target))
    matched.append(view.top if matched_ok else None)
  included = {r["class"] for r in include}
  for i, req in enumerate(exclude):
    cls, count = req["class"], req["count"]
    n = min(len(by_class.get(cls, [])), max_objects)
    ok = n < count
    if not ok:
      reasons.append(f"expected {cls}<{count}, found {n}")
    # Restraint earns credit only when something of an asked class was drawn (see docstring).
    credit = float(ok and (n > 0 or cls not in included))
    checks.append(Check("exclude", i, ok, credit))
  correct = all(c.passed for c in checks)
  # A failed check's credit is < 1, so the mean is < 1 exactly when some check failed.
  dense = sum(c.credit for c in checks) / len(checks) if checks else 1.0
  return Verdict(correct, float(correct), float(dense), "\n".join(reasons), tuple(checks))


def summary_scores(tags: Sequence[str], correct: Sequence[Any]) -> dict[str, float]:
  """GenEval's summary: per-tag accuracy and 'overall', the mean over the tags present.

  Args:
    tags: tag per image.
    correct: bool (or 0/1 score) per image.

  Returns:
    {tag: accuracy, ..., 'overall': mean of the per-tag accuracies}; GenEval's six tags first
    (those present), then any others sorted.
  """
  if len(tags) != len(correct):
    raise ValueError(f"summary_scores: {len(tags)} tags for {len(correct)} results")
  if not tags:
    raise ValueError("summary_scores: no results")
  acc: dict[str, list[float]] = {}
  for t, c in zip(tags, correct):
    acc.setdefault(t, []).append(float(c))
  order = [t for t in TAGS if t in acc] + sorted(t for t in acc if t not in TAGS)
  out = {t: sum(acc[t]) / len(acc[t]) for t in order}
  out["overall"] = sum(out.values()) / len(order)
  return out
