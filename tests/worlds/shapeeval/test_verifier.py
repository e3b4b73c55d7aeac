"""The ShapeEval verifier: detection from pixels, GenEval-style scoring, bad prompts."""

import collections

import jax
import numpy as np
import pytest

from htgrpo_jax.rewards.base import validate_rewards
from htgrpo_jax.worlds.shapeeval import codebook as patch_vq
from htgrpo_jax.worlds.shapeeval import grammar as G
from htgrpo_jax.worlds.shapeeval import scenes as W
from htgrpo_jax.worlds.shapeeval import verifier as S

CFG = W.WorldConfig()
Obj = W.ShapeObject


def _img(*objs, cfg=CFG):
  return W.render(W.Scene(tuple(objs)), cfg)


def _strict(text, *imgs):
  return S.ShapeEvalReward(mode="strict")([text] * len(imgs), np.stack(imgs))


def test_detects_shapes_colours_and_centroids_at_every_size():
  for size in CFG.sizes:
    for shape in W.SHAPES:
      for color in CFG.color_names[:3]:
        (d,) = S.detect(_img(Obj(shape, color, 8, 12, size)))
        assert (d.shape, d.color) == (shape, color)
        assert abs(d.cx - (8 + size / 2)) < 0.01  # symmetric left-right
        assert 12 < d.cy < 12 + size


def test_ground_truth_after_vq_round_trip_is_perfect_per_tag():
  rng = np.random.default_rng(0)
  train = W.render_batch([W.sample_scene(rng, [(None, None)] * int(rng.integers(1, 5))) for _ in range(300)])
  cb = patch_vq.fit_codebook(train, 128, jax.random.PRNGKey(0))
  ps = G.balanced_prompts("eval", 180, seed=4) + G.balanced_prompts("train", 150, seed=4)
  imgs = W.render_batch([G.scene_for(p.meta, rng) for p in ps])
  dec = np.asarray(patch_vq.decode(cb, patch_vq.encode(cb, imgs)))
  scores = S.ShapeEvalReward(mode="strict")([p.text for p in ps], dec)
  by_tag = collections.defaultdict(list)
  for p, s in zip(ps, scores):
    by_tag[p.meta.tag].append(s)
  assert {t: float(np.mean(v)) for t, v in by_tag.items()} == {t: 1.0 for t in G.TAGS}
  # The same images under a prompt of the same tag asking for something else fail.
  wrong = [_different(p, rng) for p in ps]
  wrong_acc = S.ShapeEvalReward(mode="strict")([q.text for q in wrong], dec).mean()
  print(f"ground truth strict 1.0 on every tag ({len(ps)} prompts); same-tag wrong prompt {wrong_acc:.3f}")
  assert wrong_acc < 0.05


def _different(p, rng):
  """A prompt of p's tag that asks for a different set of objects (order aside)."""
  key = lambda m: sorted(map(str, m.objects))
  while True:
    q = _BY_TAG[p.meta.tag][rng.integers(len(_BY_TAG[p.meta.tag]))]
    if key(q.meta) != key(p.meta):
      return q


_BY_TAG = collections.defaultdict(list)
for _p in G.all_prompts():
  _BY_TAG[_p.meta.tag].append(_p)


def test_unaligned_world_renders_are_judged_exactly():
  # Off-grid objects, other sizes: the templates come from the world, so ground truth passes.
  cfg = W.unaligned_config(48)
  rng = np.random.default_rng(2)
  ps = G.balanced_prompts("eval", 60, seed=2, cfg=cfg) + G.balanced_prompts("train", 60, seed=2, cfg=cfg)
  imgs = W.render_batch([G.scene_for(p.meta, rng, cfg) for p in ps], cfg)
  reward = S.ShapeEvalReward(cfg, mode="strict")
  assert reward([p.text for p in ps], imgs).min() == 1.0
  assert reward([_different(p, rng).text for p in ps], imgs).mean() < 0.05


def test_touching_objects_of_different_colours_are_separate():
  img = _img(Obj("square", "red", 4, 4, 8), Obj("circle", "blue", 12, 4, 8), Obj("triangle", "green", 4, 12, 8))
  dets = S.detect(img)
  assert sorted((d.shape, d.color) for d in dets) == [("circle", "blue"), ("square", "red"), ("triangle", "green")]
  assert _strict("a photo of a red square left of a blue circle", img) == 1.0


def test_same_colour_objects_count_when_apart_and_merge_when_touching():
  apart = _img(Obj("square", "red", 0, 0, 8), Obj("square", "red", 16, 0, 8))
  touching = _img(Obj("square", "red", 0, 0, 8), Obj("square", "red", 8, 0, 8))
  assert _strict("a photo of two squares", apart) == 1.0
  # One 16x8 red blob: a colour-segmentation detector sees one object of no known shape.
  (d,) = S.detect(touching)
  assert d.shape is None and d.area == 128
  assert _strict("a photo of two squares", touching) == 0.0
  assert _strict("a photo of a square", touching) == 0.0


def test_counting_fails_on_extra_instances():
  three = _img(Obj("circle", "red", 0, 0, 8), Obj("circle", "blue", 12, 0, 8), Obj("circle", "green", 24, 0, 8))
  assert _strict("a photo of three circles", three) == 1.0
  assert _strict("a photo of two circles", three) == 0.0
  assert _strict("a photo of four circles", three) == 0.0


def test_borderline_positions_follow_genevals_rule():
  # GenEval: revised offset = |offset| - 0.1 * (w_A + w_B) per axis, normalised by |offset|;
  # "left of" needs dx < -0.5. Two 8 px circles 12 px apart vertically: left of needs a horizontal
  # offset > 9.14 px, so x = 9 is not left of and x = 10 is (both are "above", dy < -0.5).
  base = Obj("circle", "red", 0, 0, 8)
  near = _img(base, Obj("circle", "blue", 9, 12, 8))
  far = _img(base, Obj("circle", "blue", 10, 12, 8))
  text = "a photo of a red circle left of a blue circle"
  assert _strict(text, near) == 0.0 and _strict(text, far) == 1.0
  assert _strict("a photo of a red circle above a blue circle", near, far).tolist() == [1.0, 1.0]
  assert _strict("a photo of a blue circle left of a red circle", far) == 0.0
  # The old single-axis rule's 4 px (> 3.2 px) here is now what GenEval calls it: above only.
  old = _img(base, Obj("circle", "blue", 4, 12, 8))
  assert _strict(text, old) == 0.0
  (r,) = S.ShapeEvalReward().details([text], old[None])
  assert "expected circle left of target, found above target" in r["reason"]


def test_specks_are_ignored_and_attached_pixels_make_objects_malformed():
  rng = np.random.default_rng(0)
  for shape in W.SHAPES:
    clean = _img(Obj(shape, "purple", 8, 8, 12))
    img = clean.copy()
    for y, x in rng.integers(0, 32, (6, 2)):  # isolated one-pixel specks of another colour
      if (img[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] == W.BACKGROUND).all():
        img[y, x] = W.COLORS["orange"]
    img[0:1, 0:3] = (128, 128, 128)  # 3 off-palette px: below the 4 px noise area
    dets = S.detect(img)
    assert [(d.shape, d.color) for d in dets] == [(shape, "purple")], shape
    text = f"a photo of a purple {shape}"
    assert _strict(text, img) == 1.0
    # A stray pixel attached to the object: the footprint is no world shape any more. (The old
    # verifier trimmed such pixels off, which is also what let blobs pass as shapes.)
    stray = clean.copy()
    stray[Obj(shape, "purple", 8, 8, 12).footprint_box[1] - 1, 14] = W.COLORS["purple"]
    (d,) = S.detect(stray)
    assert d.malformed and d.area == W.shape_mask(shape, 12).sum() + 1
    assert _strict(text, stray) == 0.0
    # 4 off-palette px (a blended patch corner) are noticeable: malformed.
    grey = clean.copy()
    grey[0:2, 0:2] = (128, 128, 128)
    assert [d.malformed for d in S.detect(grey)] == [False, True]
    assert _strict(text, grey) == 0.0


def test_dense_is_partial_and_one_exactly_when_strict():
  rng = np.random.default_rng(1)
  ps = G.balanced_prompts("train", 100, seed=0)
  imgs = W.render_batch([G.scene_for(p.meta, rng) for p in ps])
  texts = [p.text for p in ps]
  texts = texts[50:] + texts[:50]  # half the pairs no longer match
  strict = S.ShapeEvalReward(mode="strict")(texts, imgs)
  dense = S.ShapeEvalReward(mode="dense")(texts, imgs)
  assert dense.dtype == np.float32 and ((0 <= dense) & (dense <= 1)).all()
  np.testing.assert_array_equal(dense == 1.0, strict == 1.0)
  assert ((dense > 0) & (dense < 1)).any()  # partial credit exists
  # A right shape in the wrong colour earns part of "a red circle".
  blue = _img(Obj("circle", "blue", 8, 8, 8))
  assert S.ShapeEvalReward(mode="dense")(["a photo of a red circle"], blue[None])[0] == 0.5


def test_blank_image_scores_zero_everywhere():
  blank = np.zeros((len(G.TAGS), 32, 32, 3), np.uint8) + np.array(W.BACKGROUND, np.uint8)
  ps = G.balanced_prompts("eval", len(G.TAGS))
  r = S.ShapeEvalReward(mode="dense")([p.text for p in ps], blank)
  validate_rewards("dense", r, len(ps))
  assert (r == 0).all()


def test_bad_prompts_raise_or_score_zero():
  img = _img(Obj("circle", "red", 8, 8, 8))[None]
  strict = S.ShapeEvalReward(mode="strict")
  for text, word in [
      ("a photo of a pink circle", "pink"),
      ("", "empty"),
      ("a photo of a hexagon", "hexagon"),
      ("circle a photo of", "grammar"),
  ]:
    with pytest.raises(ValueError, match=word):
      strict([text], img)
  lenient = S.ShapeEvalReward(mode="dense", on_invalid="zero")
  imgs = np.concatenate([img, img])
  np.testing.assert_array_equal(lenient(["a photo of a pink circle", "a photo of a red circle"], imgs), [0.0, 1.0])
  with pytest.raises(ValueError, match="2 images but 1 prompts"):
    strict(["a photo of a circle"], imgs)
  with pytest.raises(ValueError, match="canvas"):
    strict(["a photo of a circle"], np.zeros((1, 16, 16, 3), np.uint8))
  with pytest.raises(ValueError, match="mode"):
    S.ShapeEvalReward(mode="soft")


def test_details_report_detections_and_the_hacking_watch():
  img = _img(Obj("triangle", "green", 0, 0, 8), Obj("square", "yellow", 20, 20, 12))
  (r,) = S.ShapeEvalReward().details(["a photo of a triangle and a square"], img[None])
  assert r["strict"] == 1.0 and len(r["detections"]) == 2
  assert r["meta"].tag == "two_object"
  assert r["malformed"] == 0 and r["malformed_area"] == 0 and r["reason"] == ""
  assert r["verdict"].correct
  img[0:4, 28:32] = W.COLORS["red"]  # one loose patch
  (r,) = S.ShapeEvalReward().details(["a photo of a triangle and a square"], img[None])
  assert r["strict"] == 0.0 and r["malformed"] == 1 and r["malformed_area"] == 16
  assert r["verdict"].correct  # GenEval alone would pass it; the junk makes it fail
  assert "malformed: red component of 16 px, 4x4 px at (x=28, y=0)" in r["reason"]
  assert r["dense"] == pytest.approx(0.5**0.5)  # 16 px of junk, half-life 32 px
