"""OWLv2 / OWL-ViT in Flax: parity of boxes, logits and objectness with random tiny
``transformers`` detectors read from safetensors written here; presets; post-processing."""

import jax
import numpy as np
import pytest
import torch

from htgrpo_jax.models import clip_convert, owl
from htgrpo_jax.rewards import geneval
from tests.helpers.clip_torch_reference import random_ids, save_state_dict, tiny_hf_owl

TOL = 1e-4


@pytest.mark.parametrize("kind", ["owlv2", "owlvit"])
def test_owl_matches_torch(tmp_path, kind):
  model = tiny_hf_owl(kind, seed=1)
  model.save_pretrained(str(tmp_path))
  config, params = clip_convert.load_owl(str(tmp_path))
  assert config.kind == kind and config.grid == 4
  rng = np.random.default_rng(0)
  b, q = 2, 3
  pixels = rng.standard_normal((b, 3, 32, 32)).astype(np.float32)
  ids = random_ids(rng, b * q, 16, eos=127, vocab_lo=1, bos=126, pad=0)
  ids[q - 1] = 0  # image 0's last query is padding (first id 0)
  with torch.no_grad():
    ref = model(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(pixels))
  got = jax.jit(lambda p, x, t: owl.OwlDetector(config).apply({"params": p}, x, t))(
      params, pixels.transpose(0, 2, 3, 1), ids.astype(np.int32)
  )
  r_logits, r_boxes = ref.logits.numpy(), ref.pred_boxes.numpy()
  g_logits, g_boxes = np.asarray(got["logits"]), np.asarray(got["boxes"])
  valid = r_logits > np.finfo(np.float32).min
  assert (~valid).sum() == 16 and np.array_equal(valid, g_logits > np.finfo(np.float32).min)
  e_logit = np.abs(g_logits - r_logits)[valid].max()
  e_box = np.abs(g_boxes - r_boxes).max()
  msg = f"{kind} tiny max|diff| logits {e_logit:.2e} (|ref| {np.abs(r_logits[valid]).max():.2f}) boxes {e_box:.2e}"
  if kind == "owlv2":
    r_obj = ref.objectness_logits.numpy()
    e_obj = np.abs(np.asarray(got["objectness"]) - r_obj).max()
    msg += f" objectness {e_obj:.2e}"
    assert e_obj < TOL and r_obj.std() > 0.05
  print(msg)
  assert e_logit < TOL and e_box < TOL
  assert r_logits[valid].std() > 0.1 and r_boxes.std() > 0.01  # not saturated
  # The split entry points (queries embedded once) give the same outputs.
  queries = owl.text_queries(params, ids.astype(np.int32), config).reshape(b, q, -1)
  split = owl.detect(params, pixels.transpose(0, 2, 3, 1), queries, ids.reshape(b, q, -1)[..., 0] > 0, config)
  np.testing.assert_allclose(np.asarray(split["logits"]), g_logits, atol=1e-5)
  np.testing.assert_allclose(np.asarray(split["boxes"]), g_boxes, atol=1e-6)


def test_owl_converter_names_bad_tensors(tmp_path):
  model = tiny_hf_owl("owlv2")
  model.save_pretrained(str(tmp_path))
  config, _ = clip_convert.load_owl(str(tmp_path))
  path = save_state_dict(tmp_path / "bad.safetensors", model, drop=["objectness_head.dense2.bias"])
  with pytest.raises(ValueError, match="HF owlv2 checkpoint .* missing .*objectness_head.dense2.bias"):
    clip_convert.load_owl(path, config)
  vit = owl.OwlConfig(config.clip, kind="owlvit")  # an OWLv2 file read as OWL-ViT
  with pytest.raises(ValueError, match="missing.*owlvit"):
    clip_convert.load_owl(str(tmp_path), vit)


def test_presets_match_hf_sizes():
  from transformers import Owlv2Config, Owlv2ForObjectDetection

  hf = Owlv2Config(vision_config=dict(image_size=960, patch_size=16))  # google/owlv2-base-patch16
  assert owl.from_hf_config(hf) == owl.PRESETS["owlv2_b16"]
  with torch.device("meta"):
    n_torch = sum(p.numel() for p in Owlv2ForObjectDetection(hf).parameters())
  shapes = jax.eval_shape(lambda: owl.init_params(owl.PRESETS["owlv2_b16"]))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == n_torch
  from transformers import OwlViTConfig

  assert owl.from_hf_config(OwlViTConfig()) == owl.PRESETS["owlvit_b32"]
  l14 = Owlv2Config(
      vision_config=dict(
          hidden_size=1024,
          intermediate_size=4096,
          num_attention_heads=16,
          num_hidden_layers=24,
          image_size=1008,
          patch_size=14,
      ),
      text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
      projection_dim=768,
  )
  assert owl.from_hf_config(l14) == owl.PRESETS["owlv2_l14"]


def test_detections_feed_geneval():
  """Post-processing: best query per patch, sigmoid score, corners in pixels, threshold, top 16."""
  logits = np.full((4, 3), -10.0)
  logits[0, 0], logits[1, 0], logits[2, 1], logits[3, 2] = 2.0, 0.5, 1.0, -3.0  # patch 3: below 0.1
  boxes = np.array([[0.25, 0.25, 0.5, 0.5], [0.75, 0.25, 0.5, 0.5], [0.5, 0.75, 0.2, 0.2], [0.5, 0.5, 1, 1]])
  det = owl.detections(logits, boxes, ["dog", "cat", "car"], side=100.0)
  assert [o["box"] for o in det["dog"]] == [(0.0, 0.0, 50.0, 50.0), (50.0, 0.0, 100.0, 50.0)]
  np.testing.assert_allclose([o["score"] for o in det["dog"]], 1 / (1 + np.exp([-2.0, -0.5])))
  assert len(det["cat"]) == 1 and det["car"] == []
  meta = {
      "tag": "position",
      "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["above", 0]}],
      "exclude": [],
      "prompt": "a photo of a dog above a cat",
  }
  assert geneval.evaluate(det, meta).correct
  assert not geneval.evaluate(owl.detections(logits, boxes, ["cat", "dog", "car"], 100.0), meta).correct
  assert len(owl.nms(det["dog"], 0.5)) == 2 and len(owl.nms(det["dog"] * 2, 0.5)) == 2
