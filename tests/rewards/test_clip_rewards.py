"""CLIP rewards against torch references on a random tiny ``transformers.CLIPModel``: CLIPScore
with PIL preprocessing, GenEval's colour classifier with PIL crops (GenEval's ImageCrops) and
clip_benchmark's zero-shot classifier written out in torch."""

import dataclasses

import numpy as np
import pytest
import torch

from htgrpo_jax.rewards import clip as clip_rewards
from htgrpo_jax.rewards.geneval import COLORS
from tests.helpers.clip_torch_reference import geneval_crop, save_tiny_clip_dir

MEAN = np.asarray((0.48145466, 0.4578275, 0.40821073))
STD = np.asarray((0.26862954, 0.26130258, 0.27577711))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random tiny HF CLIP saved with its tokenizer in one dir, and the loaded bundle."""
  d = tmp_path_factory.mktemp("clip")
  model, tok = save_tiny_clip_dir(d, seed=3)
  return model, tok, clip_rewards.load_clip(str(d))


def _torch_image_features(model, crops_u8):
  x = (np.stack(crops_u8).astype(np.float64) / 255 - MEAN) / STD
  with torch.no_grad():
    f = model.get_image_features(pixel_values=torch.as_tensor(x.transpose(0, 3, 1, 2), dtype=torch.float32))
  f = f.pooler_output.numpy().astype(np.float64)
  return f / np.linalg.norm(f, axis=-1, keepdims=True)


def _torch_text_features(model, tok, texts):
  ids = tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
  with torch.no_grad():
    f = model.get_text_features(input_ids=ids).pooler_output.numpy().astype(np.float64)
  return f / np.linalg.norm(f, axis=-1, keepdims=True)


def _images(seed, b=4, h=48, w=64):
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 256, (b, h // 8, w // 8, 3), dtype=np.uint8)
  return np.repeat(np.repeat(img, 8, 1), 8, 2)  # blocky, so crops differ in colour content


def test_clipscore_matches_torch(tiny):
  model, tok, bundle = tiny
  prompts = ["a photo of a red dog", "a blue car", "two green apple", "a photo of a cat"]
  images = _images(0)
  got = clip_rewards.CLIPScore(bundle)(prompts, images)
  img = _torch_image_features(model, [geneval_crop(im, (0, 0, 64, 48), size=32) for im in images])
  cos = np.sum(img * _torch_text_features(model, tok, prompts), axis=-1)
  ref = 2.5 * np.maximum(cos, 0)
  print(f"CLIPScore vs torch+PIL: max|diff| {np.abs(got - ref).max():.2e}, cos {np.round(cos, 3)}")
  assert got.dtype == np.float32 and got.shape == (4,)
  np.testing.assert_allclose(got, ref, atol=2e-3)
  raw = clip_rewards.CLIPScore(bundle).cosine(prompts, images)
  np.testing.assert_allclose(raw, cos, atol=1e-3)
  assert np.ptp(raw) > 0.05  # the prompts/images are told apart
  with pytest.raises(ValueError, match="reward 'clipscore'"):
    clip_rewards.CLIPScore(bundle)(prompts[:3], images)


def test_color_classifier_is_geneval_torch_argmax(tiny):
  """The classifier's logits and colours equal GenEval's pipeline in torch/PIL: composite on #999,
  crop, preprocess, CLIP, clip_benchmark's template-averaged weights, 100 * cos, argmax."""
  model, tok, bundle = tiny
  clf = clip_rewards.ColorClassifier(bundle)
  images = _images(1, b=2)
  boxes = np.array(
      [
          [[0, 0, 31, 24], [16.4, 8, 63, 40], [40, 0, 64, 48], [3, 30, 20, 47]],
          [[8, 8, 24, 40], [0, 0, 64, 48], [33, 5, 60, 20], [1, 1, 9, 47]],
      ],
      np.float32,
  )
  classes = [["dog", "car", "bus", "apple"], ["cat", "train", "bird", "dog"]]
  masks = np.zeros((2, 4, 48, 64), bool)
  rng = np.random.default_rng(2)
  for b in range(2):
    for k in range(4):
      x0, y0, x1, y1 = np.round(boxes[b, k]).astype(int)
      masks[b, k, y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.7
  got = clf.logits(images, boxes, classes, masks)
  assert got.shape == (2, 4, len(COLORS))
  # Reference, written from GenEval's evaluate_images.py + clip_benchmark.
  ref = np.zeros_like(got)
  weights = {}
  for name in {n for row in classes for n in row}:
    w = []
    for c in COLORS:
      t = _torch_text_features(
          model, tok, [f"a photo of a {c} {name}", f"a photo of a {c}-colored {name}", f"a photo of a {c} object"]
      )
      m = t.mean(0)
      w.append(m / np.linalg.norm(m))
    weights[name] = np.asarray(w)
  for b in range(2):
    crops = [geneval_crop(images[b], tuple(int(round(v)) for v in boxes[b, k]), masks[b, k], size=32) for k in range(4)]
    feats = _torch_image_features(model, crops)
    for k in range(4):
      ref[b, k] = 100.0 * weights[classes[b][k]] @ feats[k]
  err = np.abs(got - ref).max()
  print(f"colour logits vs torch+PIL: max|diff| {err:.2e} (logit range {np.ptp(ref):.2f})")
  assert err < 0.05
  top = np.sort(ref, -1)
  decided = top[..., -1] - top[..., -2] > 2 * err  # only where rounding cannot flip the winner
  assert decided.mean() >= 0.75
  np.testing.assert_array_equal(got.argmax(-1)[decided], ref.argmax(-1)[decided])
  assert len(set(ref.argmax(-1).ravel())) > 1  # a constant classifier would fail


def test_color_classifier_masks_and_background(tiny):
  """An all-true mask equals no mask; outside the mask only the #999 background is seen."""
  _, _, bundle = tiny
  clf = clip_rewards.ColorClassifier(bundle)
  images = _images(3, b=1)
  boxes = np.array([[[4, 4, 60, 44]]], np.float32)
  full = np.ones((1, 1, 48, 64), bool)
  np.testing.assert_allclose(
      clf.logits(images, boxes, [["dog"]], full), clf.logits(images, boxes, [["dog"]]), atol=1e-5
  )
  part = np.zeros_like(full)
  part[..., 10:30, 10:30] = True
  other = images.copy()
  other[:, ~part[0, 0]] = 0  # change only pixels outside the mask
  np.testing.assert_allclose(
      clf.logits(images, boxes, [["dog"]], part), clf.logits(other, boxes, [["dog"]], part), atol=1e-5
  )
  assert np.abs(clf.logits(images, boxes, [["dog"]], part) - clf.logits(images, boxes, [["dog"]])).max() > 1e-2
  # GenEval's per-image, per-class call (``color_classification``): the argmax colour per box.
  one = clf.logits(images, boxes, [["dog"]], part)
  assert clf(images[0], "dog", boxes[0], part[0]) == [COLORS[int(one[0, 0].argmax())]]
  assert clf(images[0], "dog", np.zeros((0, 4))) == []
  grey = np.full((1, 48, 64, 3), 153, np.uint8)
  np.testing.assert_allclose(
      clf.logits(grey, boxes, [["dog"]]), clf.logits(images, boxes, [["dog"]], np.zeros_like(full)), atol=1e-5
  )


def test_bad_inputs_are_named(tiny, tmp_path):
  _, _, bundle = tiny
  clf = clip_rewards.ColorClassifier(bundle)
  images = _images(0, b=1)
  with pytest.raises(ValueError, match="boxes must be"):
    clf.logits(images, np.zeros((2, 1, 4)), [["dog"]])
  with pytest.raises(ValueError, match="masks must be"):
    clf.logits(images, np.zeros((1, 1, 4)), [["dog"]], np.zeros((1, 1, 4, 4), bool))
  with pytest.raises(ValueError, match="classes must be"):
    clf.logits(images, np.zeros((1, 2, 4)), [["dog"]])
  with pytest.raises(ValueError, match="layout='bogus'"):
    clip_rewards.load_clip(str(tmp_path), layout="bogus")
  with pytest.raises(ValueError, match="needs config="):
    clip_rewards.load_clip(str(tmp_path), layout="open_clip")
  small = clip_rewards.CLIPBundle(
      dataclasses.replace(bundle.config, text=dataclasses.replace(bundle.config.text, vocab_size=50)),
      bundle.params,
      bundle.tokenizer,
  )
  with pytest.raises(ValueError, match="reward 'clipscore': the tokenizer gives id .* vocab_size is 50"):
    clip_rewards.CLIPScore(small)(["a red dog"], images)
  with pytest.raises(ValueError, match="no {color} field"):
    clip_rewards.ColorClassifier(bundle, templates=("a photo of a {object}",))
