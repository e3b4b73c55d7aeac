"""Why held-out colour prompts fail: what the image holds of the asked class, and in which colours.

The strict judge says *that* "a yellow circle" failed; this module says *how*, from the image's
detections (``verifier.detect``), in one of five kinds:

  pass            the judge accepted it
  no_object       no well-formed object of the asked class
  wrong_colour    the class drawn, but none in the asked colour
  extra_colour    the class in the asked colour plus another of it in a second colour (fails the
                  judge's adversarial tie ordering)
  other           the asked objects, all in the asked colour, and still failed (junk beside them)

Held-out colour prompts name colour-shape pairs the training prompts never hold
(``grammar.HELDOUT_COLOR_SHAPE``), so ``wrong_colour`` is the policy drawing a training pair's colour
instead of the asked one (docs/findings.md, section 14).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Sequence

import numpy as np
from PIL import Image

from htgrpo_jax.worlds.shapeeval import verifier
from htgrpo_jax.worlds.shapeeval.scenes import WorldConfig

KINDS = ("pass", "no_object", "wrong_colour", "extra_colour", "other")


def kind(correct: bool, shape: str, colour: str, dets: Sequence[verifier.Detection]) -> str:
  """The failure kind of one colour prompt's image (``KINDS``) from its detections."""
  if correct:
    return "pass"
  same = [d for d in dets if not d.malformed and d.shape == shape]
  asked = [d for d in same if d.color == colour]
  if not same:
    return "no_object"
  if not asked:
    return "wrong_colour"
  return "extra_colour" if len(asked) < len(same) else "other"


def tabulate(eval_dir: str, cfg: WorldConfig = WorldConfig()) -> dict:
  """Counts of each kind over the ``colors`` samples of an evaluation folder (``samples.jsonl`` + PNGs),
  and, for ``wrong_colour`` images, which colours were drawn for each asked pair.

  Returns:
    {"n": int, "kinds": {kind: count}, "drawn": {"<colour> <shape>": {drawn colour: count}}}.
  """
  with open(os.path.join(eval_dir, "samples.jsonl"), encoding="utf-8") as f:
    recs = [json.loads(line) for line in f if line.strip()]
  recs = [r for r in recs if r["tag"] == "colors"]
  if not recs:
    raise ValueError(f"{eval_dir}/samples.jsonl holds no 'colors' samples")
  kinds = collections.Counter({k: 0 for k in KINDS})
  drawn = collections.defaultdict(collections.Counter)
  for r in recs:
    (obj,) = r["metadata"]["objects"]
    image = np.asarray(Image.open(os.path.join(eval_dir, r["filename"])).convert("RGB"))
    dets = verifier.detect(image, cfg)
    k = kind(r["correct"], obj["shape"], obj["color"], dets)
    kinds[k] += 1
    if k == "wrong_colour":
      for d in dets:
        if not d.malformed and d.shape == obj["shape"]:
          drawn[f"{obj['color']} {obj['shape']}"][d.color] += 1
  return {"n": len(recs), "kinds": dict(kinds), "drawn": {k: dict(v) for k, v in sorted(drawn.items())}}


def markdown(results: dict[str, dict]) -> str:
  """One row per evaluation folder: each kind's share of its colour samples."""
  lines = ["| evaluation | n | " + " | ".join(KINDS) + " |", "|---|---:|" + "---:|" * len(KINDS)]
  for name, t in results.items():
    lines.append(f"| {name} | {t['n']} | " + " | ".join(f"{t['kinds'][k] / t['n']:.3f}" for k in KINDS) + " |")
  return "\n".join(lines) + "\n"
