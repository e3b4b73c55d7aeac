"""The ShapeEval verifier against a policy that games it with 4x4 VQ patches.

Every exploit measured on the old verifier is reproduced here and must fail; the enumerations
print their counts (run with -s). Patches are the world's own: the 15 distinct non-empty 4x4
patterns of its renders (per colour), which is everything an aligned-world codebook can emit.
"""

import collections
import itertools
import time

import numpy as np
import pytest
from scipy import ndimage

from htgrpo_jax.rewards import geneval
from htgrpo_jax.worlds.shapeeval import grammar as G
from htgrpo_jax.worlds.shapeeval import scenes as W
from htgrpo_jax.worlds.shapeeval import verifier as S
from htgrpo_jax.worlds.shapeeval.grammar import ObjectReq, PromptMeta

CFG = W.WorldConfig()
Obj = W.ShapeObject
P = CFG.patch
BG = np.array(CFG.background, np.uint8)
GREY = (128, 128, 128)  # a masked slot's decoded colour: off-palette
STRICT, DENSE = S.ShapeEvalReward(mode="strict"), S.ShapeEvalReward(mode="dense")


def blank():
  img = np.empty((CFG.canvas, CFG.canvas, 3), np.uint8)
  img[:] = BG
  return img


def paint(img, mask, y, x, rgb):
  img[y : y + mask.shape[0], x : x + mask.shape[1]][mask] = rgb
  return img


def render(*objs):
  return W.render(W.Scene(tuple(objs)))


def strict(text, img):
  return float(STRICT([text], img[None])[0])


def dense(text, img):
  return float(DENSE([text], img[None])[0])


def patterns():
  """The distinct non-empty 4x4 patterns of every world render (bool[4, 4] each)."""
  seen = {}
  for shape in CFG.shapes:
    for size in CFG.sizes:
      m = W.shape_mask(shape, size)
      for i in range(0, size, P):
        for j in range(0, size, P):
          c = m[i : i + P, j : j + P]
          if c.any():
            seen.setdefault(c.tobytes(), c.copy())
  return [seen[k] for k in sorted(seen)]


PATTERNS = patterns()


def cells(shape, size):
  """{(row, col): pattern} of a render's non-empty patches."""
  m = W.shape_mask(shape, size)
  return {
      (i // P, j // P): m[i : i + P, j : j + P]
      for i in range(0, size, P)
      for j in range(0, size, P)
      if m[i : i + P, j : j + P].any()
  }


def from_cells(pats, y=8, x=8, rgb=W.COLORS["red"], img=None):
  img = blank() if img is None else img
  for (r, c), m in pats.items():
    paint(img, m, y + r * P, x + c * P, rgb)
  return img


def is_true_render(img, det):
  """Whether ``det``'s component in ``img`` is exactly a world render of its shape and size."""
  lab, _ = ndimage.label((img == CFG.rgb(det.color)).all(-1), structure=np.ones((3, 3)))
  y0, x0, y1, x1 = det.bbox
  ey0, ex0, ey1, ex1 = W.footprint_extent(det.shape, det.size)
  want = W.shape_mask(det.shape, det.size)[ey0:ey1, ex0:ex1]
  for j, sl in enumerate(ndimage.find_objects(lab), 1):
    if (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop) == (y0, x0, y1, x1):
      if ((lab[sl] == j) == want).all():
        return True
  return False


# ------------------------------------------------------------------------ the measured exploits


def test_single_patches_and_the_full_canvas_are_not_squares():
  one = from_cells({(0, 0): np.ones((P, P), bool)})
  assert strict("a photo of a red square", one) == dense("a photo of a red square", one) == 0.0
  (d,) = S.detect(one)
  assert d.malformed and "no world shape has this extent" in d.reason
  loose = blank()
  for y, x in [(0, 0), (0, 16), (16, 0), (16, 16)]:
    paint(loose, np.ones((P, P), bool), y, x, W.COLORS["blue"])
  assert strict("a photo of four squares", loose) == 0.0
  assert dense("a photo of four squares", loose) == 0.0
  red = np.zeros_like(one) + np.array(W.COLORS["red"], np.uint8)
  assert strict("a photo of a red square", red) == 0.0
  assert dense("a photo of a red square", red) < 1e-6
  (r,) = STRICT.details(["a photo of a red square"], red[None])
  assert r["malformed"] == 1 and r["malformed_area"] == 32 * 32


def _connected_subsets(n):
  """Non-empty subsets of an n x n patch grid that form one 8-connected blob, as bool[n, n]."""
  out = []
  for bits in range(1, 2 ** (n * n)):
    g = np.array([(bits >> k) & 1 for k in range(n * n)], bool).reshape(n, n)
    if ndimage.label(g, structure=np.ones((3, 3)))[1] == 1:
      out.append(g)
  return out


def test_every_patch_blob_in_a_3x3_grid_is_malformed_unless_it_is_a_true_render():
  # Every connected blob of a 3x3 (and 2x2) patch grid, each patch filled with a solid patch or
  # with the patch of a 12 px (8 px) circle / triangle / square at that cell: only exact renders
  # are objects. (On the 218 4-connected solid blobs alone the old verifier found 30 circles and
  # 13 triangles; the issue counted 18 and 11 on its 111 blobs.)
  sources = {
      n: [("solid", {(i, j): np.ones((P, P), bool) for i in range(n) for j in range(n)})]
      + [(f"{s}{n * P}", cells(s, n * P)) for s in CFG.shapes]
      for n in (2, 3)
  }
  accepted = collections.Counter()
  blobs = 0
  for n in (2, 3):
    for g in _connected_subsets(n):
      for name, src in sources[n]:
        pats = {k: v for k, v in src.items() if g[k]}
        if not pats:
          continue
        img = from_cells(pats)
        blobs += 1
        for d in S.detect(img):
          if not d.malformed:
            assert is_true_render(img, d), (name, g.astype(int).tolist(), d)
            accepted[(d.shape, d.size, name)] += 1
  solid_subsets = len(_connected_subsets(3))
  print(
      f"\n{blobs} patch blobs ({solid_subsets} connected 3x3 subsets x 4 fillings + 2x2 ones); "
      f"accepted: {dict(accepted)}"
  )
  # Exactly the true renders: solid 2x2 blocks are 8 px squares (4 places in 3x3, 1 in 2x2), the
  # full 3x3 block the 12 px square; the 12 px triangle's two empty top corners make 4 subsets
  # draw it, and its top two patch rows are pixel for pixel an 8 px triangle (4 subsets again).
  assert accepted == {
      ("square", 8, "solid"): 5,
      ("square", 12, "solid"): 1,
      ("square", 8, "square8"): 1,
      ("square", 8, "square12"): 4,
      ("square", 12, "square12"): 1,
      ("circle", 8, "circle8"): 1,
      ("circle", 12, "circle12"): 1,
      ("triangle", 8, "triangle8"): 1,
      ("triangle", 12, "triangle12"): 4,
      ("triangle", 8, "triangle12"): 4,
  }


def test_single_patch_edits_of_true_renders_are_all_malformed():
  # Replace any one patch of a render, or of the ring of patches around it, by any pattern of the
  # world (or remove it): unless the result is again a true render, it is malformed. The printed
  # histogram is the calibration of shape_tolerance = 0 (the closest edits are 1 px off).
  hist = collections.Counter()
  edits = 0
  for shape in CFG.shapes:
    for size in CFG.sizes:
      g = size // P + 2
      base = blank()
      base_cells = {(r + 1, c + 1): m for (r, c), m in cells(shape, size).items()}
      for r, c in itertools.product(range(g), range(g)):
        for pat in PATTERNS + [np.zeros((P, P), bool)]:
          new = dict(base_cells)
          new[(r, c)] = pat
          new = {k: v for k, v in new.items() if v.any()}
          if {k: v.tobytes() for k, v in new.items()} == {k: v.tobytes() for k, v in base_cells.items()}:
            continue
          img = from_cells(new, y=0, x=0, img=base.copy())
          edits += 1
          for d in S.detect(img):
            assert d.malformed or is_true_render(img, d), (shape, size, r, c, d)
            if d.malformed and d.mismatch:
              hist[d.mismatch] += 1
  small = {k: hist[k] for k in sorted(hist)[:4]}
  print(
      f"\n{edits} single-patch edits of true renders; malformed components at the smallest "
      f"pixel distances to a footprint: {small}"
  )
  assert min(hist) == 1  # why any tolerance >= 1 would accept patch-edited shapes


def test_every_patch_is_noticeable_so_nothing_a_policy_emits_is_a_speck():
  vcfg = S.VerifierConfig()
  for pat in PATTERNS:
    assert pat.sum() >= vcfg.min_area
    assert ndimage.label(pat, structure=np.ones((3, 3)))[1] == 1
  print(f"\n{len(PATTERNS)} patterns per colour, {min(p.sum() for p in PATTERNS)}..16 px each")


def test_position_sweep_passes_exactly_what_genevals_rule_accepts():
  # Every placement of a red circle and a blue triangle on the patch grid (sizes 8/12, boxes
  # not overlapping), under all four relations: the verifier agrees with GenEval's rule on the
  # footprint boxes. The old single-axis centroid rule is counted for comparison.
  total = agree = geneval_yes = old_yes_geneval_no = 0
  for sa, sb in [(8, 8), (12, 8), (8, 12)]:
    for ax, ay, bx, by in itertools.product(
        range(0, 33 - sa, P), range(0, 33 - sa, P), range(0, 33 - sb, P), range(0, 33 - sb, P)
    ):
      a, b = Obj("circle", "red", ax, ay, sa), Obj("triangle", "blue", bx, by, sb)
      if not W._boxes_clear(a, b, 0):
        continue
      img = render(a, b)
      dets = S.detect(img)
      ca = np.argwhere(W.shape_mask("circle", sa)).mean(0) + (ay + 0.5, ax + 0.5)
      cb = np.argwhere(W.shape_mask("triangle", sb)).mean(0) + (by + 0.5, bx + 0.5)
      for rel in W.RELATIONS:
        meta = PromptMeta("position", (ObjectReq("circle", "red"), ObjectReq("triangle", "blue")), rel)
        got = S.judge(meta, dets).strict == 1.0
        want = rel in geneval.relative_position(a.footprint_box, b.footprint_box)
        old = {"left of": cb[1] - ca[1], "right of": ca[1] - cb[1], "above": cb[0] - ca[0], "below": ca[0] - cb[0]}[
            rel
        ] > 0.1 * CFG.canvas
        total += 1
        agree += got == want
        geneval_yes += want
        old_yes_geneval_no += old and not want
        assert got == want, (a, b, rel)
  print(
      f"\nposition sweep: {total} (placement, relation) cases, GenEval accepts {geneval_yes}, "
      f"verifier agrees on {agree}; the old single-axis rule accepted {old_yes_geneval_no} that "
      "GenEval rejects"
  )
  assert old_yes_geneval_no > 0 and agree == total


def test_counting_sees_fragments_and_extra_objects():
  text = "a photo of two triangles"
  two = render(Obj("triangle", "red", 0, 0, 12), Obj("triangle", "blue", 20, 0, 12))
  assert strict(text, two) == 1.0 and dense(text, two) == 1.0
  # Three half-triangles (the left / right halves of a 12 px triangle) next to them.
  tri = cells("triangle", 12)
  halves = [
      {k: v for k, v in tri.items() if k[1] < 1},
      {k: v for k, v in tri.items() if k[1] > 1},
      {k: v for k, v in tri.items() if k[1] < 1},
  ]
  img = two.copy()
  for h, (y, x) in zip(halves, [(20, 0), (20, 0), (20, 16)]):  # columns 0-3, 8-11, 16-19
    from_cells(h, y=y, x=x, rgb=W.COLORS["green"], img=img)
  (r,) = DENSE.details([text], img[None])
  # Small fragments cannot hide a triangle, so they only cost their area: 3 x 16 px.
  assert r["strict"] == 0.0 and r["malformed"] == 3 and r["malformed_area"] == 48
  assert r["dense"] == pytest.approx(0.5 ** (48 / 32))
  # Every proper fragment of every render (a subset of its patches) is malformed on its own,
  # unless it is pixel for pixel a smaller render (a 2x2 corner of the 12 px square, the top of the
  # 12 px triangle).
  n, smaller = 0, collections.Counter()
  for shape in CFG.shapes:
    for size in CFG.sizes:
      cs = cells(shape, size)
      for k in range(1, len(cs)):
        for keep in itertools.combinations(sorted(cs), k):
          img = from_cells({c: cs[c] for c in keep})
          n += 1
          for d in S.detect(img):
            assert d.malformed or (is_true_render(img, d) and d.size < size), (shape, keep, d)
            smaller[(shape, size, d.shape, d.size)] += not d.malformed
  print(
      f"\n{n} proper patch fragments of renders: all malformed except smaller true renders "
      f"{ {k: v for k, v in smaller.items() if v} }"
  )
  # An extra well-formed triangle: GenEval's exclude clause.
  three = render(
      Obj("triangle", "red", 0, 0, 12), Obj("triangle", "blue", 20, 0, 12), Obj("triangle", "green", 0, 20, 8)
  )
  assert strict(text, three) == 0.0 and dense(text, three) == 0.5


def test_colour_hedging_fails_and_never_beats_committing():
  text = "a photo of a red circle"
  red, blue, green = (Obj("circle", c, x, 8, 8) for c, x in [("red", 0), ("blue", 12), ("green", 24)])
  hedge = render(red, blue, green)
  assert strict(text, hedge) == 0.0
  (r,) = STRICT.details([text], hedge[None])
  assert "tie-ambiguous" in r["reason"]
  # Hedging earns what a committed wrong colour earns, never more.
  assert dense(text, hedge) == dense(text, render(blue)) == 0.5 and dense(text, render(red)) == 1
  # Position prompts: a second red circle on the wrong side, or a circle of an unasked colour.
  pos = "a photo of a red circle left of a blue square"
  ok = render(Obj("circle", "red", 0, 12, 8), Obj("square", "blue", 16, 12, 8))
  assert strict(pos, ok) == 1.0
  both_sides = render(Obj("circle", "red", 0, 12, 8), Obj("square", "blue", 12, 12, 8), Obj("circle", "red", 24, 12, 8))
  assert strict(pos, both_sides) == 0.0 and dense(pos, both_sides) < 1
  same = "a photo of a red circle below a green circle"
  ok = render(Obj("circle", "green", 8, 0, 8), Obj("circle", "red", 8, 20, 8))
  assert strict(same, ok) == 1.0
  extra = render(Obj("circle", "green", 8, 0, 8), Obj("circle", "red", 8, 20, 8), Obj("circle", "yellow", 24, 8, 8))
  assert strict(same, extra) == 0.0 and dense(same, extra) < dense(same, ok)


def test_other_malformations_a_patch_policy_could_try():
  red = W.COLORS["red"]
  cases = {
      "16 px square (4x4 patches)": paint(blank(), np.ones((16, 16), bool), 8, 8, red),
      "4 px square (one patch)": paint(blank(), np.ones((4, 4), bool), 8, 8, red),
      "16 px circle footprint": paint(blank(), W.shape_mask("circle", 16), 8, 8, red),
      "upside-down triangle": paint(blank(), W.shape_mask("triangle", 12)[::-1], 8, 8, red),
      "sideways triangle": paint(blank(), W.shape_mask("triangle", 12).T.copy(), 8, 8, red),
      "two red squares sharing an edge": render(Obj("square", "red", 0, 0, 8), Obj("square", "red", 8, 0, 8)),
      "two red squares touching at a corner": render(Obj("square", "red", 0, 0, 8), Obj("square", "red", 8, 8, 8)),
      "red square touching a red triangle": render(Obj("square", "red", 0, 0, 8), Obj("triangle", "red", 8, 0, 8)),
      "circle with a patch missing": from_cells({k: v for k, v in cells("circle", 12).items() if k != (1, 1)}),
      "square with the centre patch missing": from_cells({k: v for k, v in cells("square", 12).items() if k != (1, 1)}),
      "circle half red, half blue": from_cells(
          {k: v for k, v in cells("circle", 8).items() if k[1] == 1},
          img=from_cells({k: v for k, v in cells("circle", 8).items() if k[1] == 0}, rgb=W.COLORS["blue"]),
      ),
      "off-palette circle": paint(blank(), W.shape_mask("circle", 8), 8, 8, GREY),
      "overlapping red squares": paint(render(Obj("square", "red", 0, 0, 12)), np.ones((12, 12), bool), 4, 4, red),
  }
  prompts = [p.text for p in G.all_prompts() if p.meta.tag in ("single_object", "colors")]
  for name, img in cases.items():
    dets = S.detect(img)
    assert dets and all(d.malformed for d in dets), (name, dets)
    r = STRICT(prompts, np.repeat(img[None], len(prompts), 0))
    assert r.max() == 0.0, name
  # Touching objects of different colours stay two objects (a detector would see both).
  two = render(Obj("square", "red", 0, 0, 8), Obj("circle", "blue", 8, 0, 8))
  assert [d.malformed for d in S.detect(two)] == [False, False]
  print(f"\n{len(cases)} further malformations x {len(prompts)} prompts: none passes")


# ------------------------------------------------------------------------ dense is monotone


def _random_junk(rng, img):
  """Paints a random patch blob (world patterns, solid or partial) on background pixels only."""
  out = img.copy()
  rgb = GREY if rng.random() < 0.15 else CFG.rgb(CFG.color_names[rng.integers(6)])
  r, c = rng.integers(CFG.grid, size=2)
  for _ in range(int(rng.integers(1, 5))):
    pat = PATTERNS[rng.integers(len(PATTERNS))] if rng.random() < 0.7 else np.ones((P, P), bool)
    box = out[r * P : (r + 1) * P, c * P : (c + 1) * P]
    free = (box == BG).all(-1) & pat
    box[free] = rgb
    dr, dc = rng.integers(-1, 2, size=2)
    r, c = int(np.clip(r + dr, 0, CFG.grid - 1)), int(np.clip(c + dc, 0, CFG.grid - 1))
  return out


def _scene(rng, meta):
  """A ground-truth scene of ``meta`` plus 0-2 random extra objects where they fit."""
  objs = list(G.scene_for(meta, rng).objects)
  for _ in range(int(rng.integers(0, 3))):
    o = _place(rng, objs, CFG.shapes[rng.integers(3)], CFG.color_names[rng.integers(6)], 20)
    objs += [o] if o is not None else []
  return W.Scene(tuple(objs))


def _place(rng, objs, shape, color, tries=300):
  """A new object on the grid clear of ``objs`` by the world's gap, or None."""
  for _ in range(tries):
    size = int(CFG.sizes[rng.integers(len(CFG.sizes))])
    x, y = (int(v) * P for v in rng.integers((CFG.canvas - size) // P + 1, size=2))
    o = Obj(shape, color, x, y, size)
    if all(W._boxes_clear(o, p, CFG.min_gap) for p in objs):
      return o
  return None


def _objects(dets):
  return sorted((d.shape, d.color, d.bbox) for d in dets if not d.malformed)


@pytest.mark.parametrize("half_life", [32.0, 1e6])
def test_junk_never_raises_dense_over_random_scenes(half_life):
  # With a huge half-life the area penalty is ~1, so only the spoiling rule keeps junk from paying
  # (e.g. junk that swallows the third triangle of "two triangles"): the proof covers any value.
  reward = S.ShapeEvalReward(mode="dense", vcfg=S.VerifierConfig(junk_half_life=half_life))
  rng = np.random.default_rng(0)
  ps = G.all_prompts()
  cases = lowered = repairs = 0
  for _ in range(600):
    p = ps[rng.integers(len(ps))]
    img = render(*_scene(rng, p.meta).objects) if rng.random() < 0.8 else _random_junk(rng, blank())
    new = _random_junk(rng, img)
    (a,), (b,) = reward.details([p.text], img[None]), reward.details([p.text], new[None])
    if not set(_objects(b["detections"])) <= set(_objects(a["detections"])):
      repairs += 1  # the paint completed a shape: that is drawing, not junk
      continue
    cases += 1
    assert b["dense"] <= a["dense"] + 1e-12, (p.text, a["reason"], b["reason"])
    assert b["strict"] <= a["strict"]
    if b["malformed_area"] > a["malformed_area"] and a["dense"] > 0:
      assert b["dense"] < a["dense"]
      lowered += 1
  print(
      f"\njunk (half-life {half_life:g} px): {cases} random scene + junk cases, dense never "
      f"rose, strictly fell in {lowered}; "
      f"{repairs} paints completed a shape and were skipped"
  )
  assert cases > 400 and lowered > 200


def test_hedged_extra_objects_never_raise_dense():
  rng = np.random.default_rng(1)
  ps = G.all_prompts()
  cases = lowered = 0
  for _ in range(600):
    p = ps[rng.integers(len(ps))]
    s = _scene(rng, p.meta)  # holds every clause's count already
    req = p.meta.objects[rng.integers(len(p.meta.objects))]
    color = CFG.color_names[rng.integers(len(CFG.color_names))]
    h = _place(rng, s.objects, req.shape, color)
    if h is None:
      continue
    img, new = render(*s.objects), render(*s.objects, h)
    (a,), (b,) = DENSE.details([p.text], img[None]), DENSE.details([p.text], new[None])
    cases += 1
    assert b["dense"] <= a["dense"] + 1e-12, (p.text, s, h)
    assert b["strict"] <= a["strict"]
    lowered += b["dense"] < a["dense"]
  print(
      f"\nhedges: {cases} scenes + an extra object of an asked shape in a random colour; dense "
      f"never rose, fell in {lowered}"
  )
  assert cases > 400 and lowered > 100


def test_specks_change_nothing():
  rng = np.random.default_rng(2)
  ps = G.balanced_prompts("train", 200, seed=2)
  for p in ps:
    img = render(*G.scene_for(p.meta, rng).objects)
    specked = img.copy()
    for _ in range(int(rng.integers(1, 6))):
      y, x = rng.integers(2, CFG.canvas - 4, size=2)
      k = int(rng.integers(1, S.VerifierConfig().min_area))  # 1..3 px in a row
      if (specked[y - 2 : y + 3, x - 2 : x + k + 2] == BG).all():  # isolated from every colour
        rgb = GREY if rng.random() < 0.3 else CFG.rgb(CFG.color_names[rng.integers(6)])
        specked[y, x : x + k] = rgb
    (a,), (b,) = DENSE.details([p.text], img[None]), DENSE.details([p.text], specked[None])
    assert (a["strict"], a["dense"], a["detections"]) == (b["strict"], b["dense"], b["detections"])


# ----------------------------------------------------------------------------------- speed


def test_speed_per_image():
  rng = np.random.default_rng(3)
  ps = G.balanced_prompts("eval", 800, seed=3)
  imgs = np.stack(
      [
          render(*G.scene_for(p.meta, rng).objects)
          if i % 2
          else _random_junk(rng, render(*G.scene_for(p.meta, rng).objects))
          for i, p in enumerate(ps)
      ]
  )
  texts = [p.text for p in ps]
  DENSE(texts[:8], imgs[:8])  # warm caches
  t = time.perf_counter()
  DENSE(texts, imgs)
  ms = (time.perf_counter() - t) / len(ps) * 1e3
  print(f"\nverifier: {ms:.2f} ms/image over {len(ps)} images (half with junk)")
  assert ms < 15.0
