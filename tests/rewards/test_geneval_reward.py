"""The on-device GenEval-style reward end to end on random tiny OWLv2 + CLIP models (written here):
it runs, its scores are valid, and a detector whose heads are set by hand gives the verdicts the
rules say."""

import jax
import numpy as np
import pytest

from htgrpo_jax.rewards import clip as clip_rewards
from htgrpo_jax.rewards import geneval
from htgrpo_jax.rewards import geneval_reward as gr
from tests.helpers.clip_torch_reference import save_tiny_clip_dir, save_tiny_owl_dir


def _rec(tag, include, exclude=(), prompt=""):
  return {"tag": tag, "include": list(include), "exclude": list(exclude), "prompt": prompt}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  d_owl, d_clip = tmp_path_factory.mktemp("owl"), tmp_path_factory.mktemp("clip")
  save_tiny_owl_dir(d_owl)
  save_tiny_clip_dir(d_clip)
  return gr.load_owl(str(d_owl)), clip_rewards.ColorClassifier(clip_rewards.load_clip(str(d_clip)))


def _images(b, seed=0):
  rng = np.random.default_rng(seed)
  return np.repeat(np.repeat(rng.integers(0, 256, (b, 8, 8, 3), dtype=np.uint8), 4, 1), 4, 2)  # 32 x 32


def test_random_models_give_valid_scores(models):
  owl_bundle, colors = models
  meta = [
      _rec("single_object", [{"class": "dog", "count": 1}]),
      _rec("two_object", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]),
      _rec("counting", [{"class": "car", "count": 3}], [{"class": "car", "count": 4}]),
      _rec("colors", [{"class": "bus", "count": 1, "color": "red"}]),
      _rec("position", [{"class": "train", "count": 1}, {"class": "bird", "count": 1, "position": ["above", 0]}]),
      _rec(
          "color_attr",
          [{"class": "apple", "count": 1, "color": "green"}, {"class": "dog", "count": 1, "color": "white"}],
      ),
  ]
  prompts = [m["tag"] for m in meta]
  for mode in ("dense", "strict"):
    reward = gr.GenEvalReward(owl_bundle, colors, mode=mode)
    s = reward(prompts, _images(6), meta=meta)
    assert s.dtype == np.float32 and s.shape == (6,) and np.isfinite(s).all()
    assert ((s >= 0) & (s <= 1)).all()
    if mode == "strict":
      assert set(np.unique(s)) <= {0.0, 1.0}
  # JSON strings (the t2i world's prompt records) are accepted too.
  import json

  assert gr.GenEvalReward(owl_bundle, colors)(prompts[:1], _images(1), meta=[json.dumps(meta[0])]).shape == (1,)


def _forced(bundle, shift):
  """Every patch detects its best query with score sigmoid(cos + shift); boxes are the patch grid
  (box MLP output 0: the box bias alone, a 1/4-wide box at each patch's grid corner)."""
  p = jax.tree.map(np.array, bundle.params)
  p["class_head"]["logit_shift"]["kernel"][:] = 0
  p["class_head"]["logit_shift"]["bias"][:] = shift
  p["class_head"]["logit_scale"]["kernel"][:] = 0
  p["class_head"]["logit_scale"]["bias"][:] = 0  # elu(0) + 1 = 1
  p["box_head"]["dense2"]["kernel"][:] = 0
  p["box_head"]["dense2"]["bias"][:] = 0
  return gr.OwlBundle(bundle.config, p, bundle.tokenizer)


def test_constructed_detector_gives_the_rules_verdicts(models):
  owl_bundle, colors = models
  on = gr.GenEvalReward(_forced(owl_bundle, 5.0), colors)
  images = _images(1, seed=3)
  one = _rec("single_object", [{"class": "dog", "count": 1}])
  two = _rec("counting", [{"class": "dog", "count": 2}], [{"class": "dog", "count": 3}])
  dets = on.detections(images, [one])[0]
  boxes = sorted(o["box"] for o in dets["dog"])
  assert len(boxes) == 16  # 16 patches, disjoint grid boxes survive NMS; all above 0.9
  np.testing.assert_allclose(boxes[0], (4, 4, 12, 12), atol=0.01)
  assert min(o["score"] for o in dets["dog"]) > 0.9
  assert on(["a dog"], images, meta=[one])[0] == 1.0
  v = on.judge(["two dogs"], images, meta=[two])[0]
  assert not v.correct and v.dense == pytest.approx(0.5)  # count met (16 >= 2), exclude (< 3) failed
  # Colour: the top-scoring dog's colour by the classifier, called on its own.
  top = max(dets["dog"], key=lambda o: o["score"])
  c = colors(images[0], "dog", np.asarray([top["box"]]))[0]
  other = next(x for x in geneval.COLORS if x != c)
  coloured = [_rec("colors", [{"class": "dog", "count": 1, "color": col}]) for col in (c, other)]
  strict = gr.GenEvalReward(_forced(owl_bundle, 5.0), colors, mode="strict")
  np.testing.assert_array_equal(strict(["x", "y"], np.repeat(images, 2, 0), meta=coloured), [1.0, 0.0])
  # Nothing detected: the single-object prompt scores 0.
  off = gr.GenEvalReward(_forced(owl_bundle, -20.0), colors)
  assert off.detections(images, [one])[0]["dog"] == [] and off(["a dog"], images, meta=[one])[0] == 0.0


def test_bad_input_is_named(models):
  owl_bundle, colors = models
  reward = gr.GenEvalReward(owl_bundle, colors)
  with pytest.raises(ValueError, match="needs meta="):
    reward(["a dog"], _images(1))
  with pytest.raises(ValueError, match=r"meta\[0\] must be a GenEval record"):
    reward(["a dog"], _images(1), meta=[{"prompt": "a dog"}])
  with pytest.raises(ValueError, match="mode='soft'"):
    gr.GenEvalReward(owl_bundle, colors, mode="soft")


@pytest.mark.slow  # ~45 s: two more model loads and 8-device compiles
def test_runs_data_parallel_on_a_mesh(models, tmp_path):
  """On an 8-device mesh (params replicated, a batch of 3 padded to 8) the reward, the colour
  logits and CLIPScore equal the single-device results."""
  from htgrpo_jax import parallel

  owl_bundle, colors = models
  mesh = parallel.make_mesh(data=-1)
  save_tiny_owl_dir(tmp_path / "owl")
  save_tiny_clip_dir(tmp_path / "clip")
  owl_m = gr.load_owl(str(tmp_path / "owl"), mesh=mesh)
  clip_m = clip_rewards.load_clip(str(tmp_path / "clip"), mesh=mesh)
  colors_m = clip_rewards.ColorClassifier(clip_m, mesh=mesh)
  assert len(jax_devices(owl_m.params)) == 8
  meta = [_rec("colors", [{"class": "dog", "count": 1, "color": c}]) for c in ("red", "blue", "green")]
  images = _images(3, seed=5)
  forced, forced_m = _forced(owl_bundle, 5.0), _forced(owl_m, 5.0)
  forced_m = gr.OwlBundle(
      forced_m.config,
      jax.device_put(forced_m.params, parallel.replicated(parallel.auto_mesh(mesh))),
      forced_m.tokenizer,
  )
  single = gr.GenEvalReward(forced, colors)
  sharded = gr.GenEvalReward(forced_m, colors_m, mesh=mesh)
  np.testing.assert_array_equal(sharded(["x"] * 3, images, meta=meta), single(["x"] * 3, images, meta=meta))
  boxes = np.tile(np.asarray([[[2, 2, 20, 30], [10, 0, 32, 12]]], np.float32), (3, 1, 1))
  np.testing.assert_allclose(
      colors_m.logits(images, boxes, [["dog", "cat"]] * 3),
      colors.logits(images, boxes, [["dog", "cat"]] * 3),
      atol=1e-4,
  )
  prompts = ["a red dog", "a cat", "a photo of a bus"]
  np.testing.assert_allclose(
      clip_rewards.CLIPScore(clip_m, mesh=mesh, weight=1.0).cosine(prompts, images),
      clip_rewards.CLIPScore(colors.bundle, weight=1.0).cosine(prompts, images),
      atol=1e-5,
  )


def jax_devices(tree):
  return {d for leaf in jax.tree.leaves(tree) for d in leaf.devices()}
