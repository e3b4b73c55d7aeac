"""CLIP in Flax: parity with random tiny ``transformers.CLIPModel`` and open_clip models read from
safetensors written here, preset sizes, converter validation, the JAX preprocessing against PIL,
the local tokenizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from htgrpo_jax.models import clip, clip_convert, clip_image
from tests.helpers.clip_torch_reference import (
    geneval_crop,
    hf_text_vision,
    import_open_clip,
    open_clip_cfg,
    random_ids,
    randomize,
    save_state_dict,
    tiny_hf_clip,
    write_clip_tokenizer,
)

TOL = 1e-5


def _features(config, params, pixels_nhwc, ids):
  img = jax.jit(lambda p, x: clip.CLIP(config).apply({"params": p}, x, method="encode_image"))(params, pixels_nhwc)
  txt = jax.jit(lambda p, t: clip.CLIP(config).apply({"params": p}, t, method="encode_text"))(params, ids)
  return np.asarray(img), np.asarray(txt)


def _rel(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
  model = tiny_hf_clip(seed=0)
  d = tmp_path_factory.mktemp("hf_clip")
  model.save_pretrained(str(d))  # config.json + model.safetensors, as on the Hub
  config, params = clip_convert.load_hf_clip(str(d))
  return model, str(d), config, params


@pytest.mark.parametrize("eos,act", [(2, "quick_gelu"), (127, "gelu")])
def test_hf_clip_matches_torch(tmp_path, eos, act):
  model = tiny_hf_clip(seed=1, eos=eos, act=act)
  model.save_pretrained(str(tmp_path))
  config, params = clip_convert.load_hf_clip(str(tmp_path))
  assert config.text.eos_token_id == eos and config.vision.act == act
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
  # eos=2: pooled at argmax(ids) (EOS 127 the largest id); eos=127: at its first occurrence, with
  # padding = EOS as OpenAI's tokenizer pads.
  ids = random_ids(rng, 4, 16, eos=127, vocab_lo=3, bos=126 if eos == 2 else 5)
  with torch.no_grad():
    ref_img = model.get_image_features(pixel_values=torch.as_tensor(pixels)).pooler_output.numpy()
    ref_txt = model.get_text_features(input_ids=torch.as_tensor(ids)).pooler_output.numpy()
  img, txt = _features(config, params, pixels.transpose(0, 2, 3, 1), ids.astype(np.int32))
  e_img, e_txt = np.abs(img - ref_img).max(), np.abs(txt - ref_txt).max()
  print(
      f"HF CLIP tiny ({act}, eos={eos}) max|diff| image {e_img:.2e} text {e_txt:.2e} "
      f"(|ref| max {np.abs(ref_img).max():.2f} / {np.abs(ref_txt).max():.2f})"
  )
  assert e_img < TOL and e_txt < TOL
  assert ref_img.std() > 0.1 and ref_txt.std() > 0.1  # not a degenerate random net
  np.testing.assert_allclose(float(params["logit_scale"]), float(model.logit_scale.detach()), rtol=1e-7)


def test_hf_pooling_rules_differ(hf_pair):
  """A token id above the EOS before it: argmax pooling (eos_token_id=2) and first-EOS pooling
  read different positions (so the test above exercises both rules)."""
  ids = np.array([[126, 5, 127, 1, 1, 1]])
  assert int(clip.eos_positions(jnp.asarray(ids), None)[0]) == 2
  ids = np.array([[5, 127, 3, 127, 1]])
  assert int(clip.eos_positions(jnp.asarray(ids), 127)[0]) == 1
  ids = np.array([[5, 120, 3, 127, 126]])
  assert int(clip.eos_positions(jnp.asarray(ids), 2)[0]) == 3
  assert int(clip.eos_positions(jnp.asarray(ids), 126)[0]) == 4


def test_open_clip_matches_torch(tmp_path):
  open_clip = import_open_clip()
  for quick in (True, False):
    cfg = open_clip_cfg()
    torch.manual_seed(0)
    model = randomize(open_clip.CLIP(**cfg, quick_gelu=quick), seed=2)
    path = save_state_dict(tmp_path / f"open_clip_model_{quick}.safetensors", model)
    config = clip.from_open_clip_config(cfg, quick_gelu=quick)
    params = clip_convert.load_open_clip(path, config)
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    ids = random_ids(rng, 4, 16, eos=127, vocab_lo=1, bos=126, pad=0)  # open_clip pads with 0
    with torch.no_grad():
      ref_img = model.encode_image(torch.as_tensor(pixels)).numpy()
      ref_txt = model.encode_text(torch.as_tensor(ids)).numpy()
    img, txt = _features(config, params, pixels.transpose(0, 2, 3, 1), ids.astype(np.int32))
    e_img, e_txt = np.abs(img - ref_img).max(), np.abs(txt - ref_txt).max()
    print(f"open_clip tiny (quick_gelu={quick}) max|diff| image {e_img:.2e} text {e_txt:.2e}")
    assert e_img < TOL and e_txt < TOL
    assert ref_img.std() > 0.1 and ref_txt.std() > 0.1


def test_open_clip_transform_matches_jax_preprocess():
  """open_clip's own eval transform (torchvision on PIL) vs ``clip_image.preprocess``."""
  open_clip = import_open_clip()
  from PIL import Image

  tf = open_clip.image_transform(224, is_train=False)
  rng = np.random.default_rng(3)
  for h, w in ((300, 517), (512, 512), (97, 64)):
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ref = tf(Image.fromarray(img)).numpy().transpose(1, 2, 0)
    got = np.asarray(clip_image.preprocess(img[None], 224))[0]
    diff = np.abs((got - ref) * np.asarray(clip_image.OPENAI_STD)) * 255  # in uint8 steps
    print(
        f"open_clip transform vs JAX, {h}x{w}: max|diff| {diff.max():.3f} uint8 steps, share off by "
        f">0.5: {(diff > 0.5).mean():.4f}"
    )
    # PIL rounds fixed-point sums after each pass; a tie rounded the other way in the first pass
    # can move the second by up to 2 steps (upsampling, where the bicubic lobes sum above 1).
    assert diff.max() <= 2.01 and (diff > 0.5).mean() < 0.01, (h, w)


def test_presets_match_hf_and_open_clip_sizes():
  from transformers import CLIPConfig, CLIPModel

  hf = {
      "vit_b32": CLIPConfig(
          projection_dim=512,
          text_config=dict(hidden_size=512, num_attention_heads=8, intermediate_size=2048, eos_token_id=2),
          vision_config=dict(
              patch_size=32, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12
          ),
      ),
      "vit_l14": CLIPConfig(
          projection_dim=768,
          text_config=dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, eos_token_id=2),
          vision_config=dict(
              patch_size=14, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24
          ),
      ),
  }
  for name, cfg in hf.items():
    ours = clip.from_hf_config(cfg)
    assert ours.vision == clip.PRESETS[name].vision and ours.projection_dim == clip.PRESETS[name].projection_dim
    assert dataclass_replace(ours.text, eos_token_id=None) == clip.PRESETS[name].text
    with torch.device("meta"):
      n_torch = sum(p.numel() for p in CLIPModel(cfg).parameters())
    shapes = jax.eval_shape(lambda: clip.init_params(clip.PRESETS[name]))
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert n_ours == n_torch, (name, n_ours, n_torch)
  # open_clip's ViT-L-14.json (GenEval's classifier, pretrained="openai" => QuickGELU).
  l14 = dict(
      embed_dim=768,
      vision_cfg=dict(image_size=224, layers=24, width=1024, patch_size=14),
      text_cfg=dict(context_length=77, vocab_size=49408, width=768, heads=12, layers=12),
  )
  assert clip.from_open_clip_config(l14, quick_gelu=True) == clip.PRESETS["vit_l14"]
  b32 = dict(
      embed_dim=512,
      vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=32),
      text_cfg=dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12),
  )
  assert clip.from_open_clip_config(b32, quick_gelu=True) == clip.PRESETS["vit_b32"]
  assert clip.from_open_clip_config(b32).vision.act == "gelu"  # LAION weights: no QuickGELU
  with pytest.raises(ValueError, match="vision_cfg.ls_init_value"):
    clip.from_open_clip_config({**l14, "vision_cfg": {**l14["vision_cfg"], "ls_init_value": 1e-5}})


def dataclass_replace(x, **kw):
  import dataclasses

  return dataclasses.replace(x, **kw)


def test_hf_converter_names_bad_tensors(hf_pair, tmp_path):
  model, _, config, _ = hf_pair
  bad = [
      (dict(drop=["text_model.final_layer_norm.bias"]), "missing.*text_model.final_layer_norm.bias"),
      (dict(add=["vision_model.head.weight"]), "unexpected.*vision_model.head.weight"),
      (dict(reshape=("visual_projection.weight", (24, 47))), "visual_projection.weight has shape"),
  ]
  for kw, match in bad:
    path = save_state_dict(tmp_path / "model.safetensors", model, **kw)
    with pytest.raises(ValueError, match=match):
      clip_convert.load_hf_clip(path, config)
  # The open_clip reader refuses an HF file, naming what it misses.
  path = save_state_dict(tmp_path / "model.safetensors", model)
  with pytest.raises(ValueError, match="open_clip checkpoint.*missing.*ln_final.bias"):
    clip_convert.load_open_clip(path, config)
  with pytest.raises(ValueError, match="no config.json"):
    clip_convert.load_hf_clip(path)


def test_hf_config_refuses_unknown_activation():
  text, vision = hf_text_vision(act="relu")
  with pytest.raises(ValueError, match="vision_config.hidden_act='relu'"):
    clip.from_hf_config({"text_config": text, "vision_config": vision, "projection_dim": 8})


# ------------------------------------------------------------------------------------------------
# Preprocessing and tokenizer.


def test_crops_match_pil_geneval_pipeline():
  """Mask composite on #999, crop to the (float) box, shortest side -> 224 bicubic, centre crop:
  the JAX weights (one compiled program for every box) against PIL, within PIL's uint8 rounding."""
  rng = np.random.default_rng(0)
  h, w = 96, 128
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  image[20:70, 30:90] = (200, 40, 40)  # a flat region, where bicubic overshoot must clip
  boxes = np.array(
      [[30.4, 20.0, 90.0, 70.0], [0, 0, 128, 96], [5.6, 7.2, 17.1, 60.0], [100, 3, 127, 9], [10, 10, 250, 60]],
      np.float32,
  )  # upsampled, downsampled, tall, wide, past the edge
  masks = np.zeros((len(boxes), h, w), bool)
  for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
    masks[k, y0 : min(y1, h), x0 : (x0 + x1) // 2] = True
  got = np.asarray(clip_image.preprocess_boxes(image[None], boxes[None], masks[None]))[0]
  got_u8 = (got * np.asarray(clip_image.OPENAI_STD) + np.asarray(clip_image.OPENAI_MEAN)) * 255
  for k, box in enumerate(boxes):
    pil_box = tuple(int(round(v)) for v in box)
    pil_box = (pil_box[0], pil_box[1], min(pil_box[2], w), min(pil_box[3], h))
    ref = geneval_crop(image, pil_box, masks[k]).astype(np.float64)
    diff = np.abs(got_u8[k] - ref)
    print(f"box {box}: max|diff| {diff.max():.3f} uint8 steps, share off by >0.5: {(diff > 0.5).mean():.4f}")
    assert diff.max() < 1.01 and (diff > 0.5).mean() < 0.02, k
  # Without masks the whole box is used.
  nomask = np.asarray(clip_image.preprocess_boxes(image[None], boxes[None, :1]))[0, 0]
  nomask_u8 = (nomask * np.asarray(clip_image.OPENAI_STD) + np.asarray(clip_image.OPENAI_MEAN)) * 255
  assert np.abs(nomask_u8 - geneval_crop(image, (30, 20, 90, 70))).max() < 1.01


def test_preprocess_whole_image_matches_pil():
  rng = np.random.default_rng(1)
  for h, w in ((64, 64), (50, 81), (300, 200)):
    img = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    got = np.asarray(clip_image.preprocess(img, 32))
    got_u8 = (got * np.asarray(clip_image.OPENAI_STD) + np.asarray(clip_image.OPENAI_MEAN)) * 255
    for b in range(2):
      assert np.abs(got_u8[b] - geneval_crop(img[b], (0, 0, w, h), size=32)).max() < 1.01


def test_tokenizer_from_local_dir(tmp_path):
  write_clip_tokenizer(tmp_path)
  tok = clip.load_tokenizer(str(tmp_path))
  ids = clip.tokenize(tok, ["a photo of a red dog", "a photo of a blue-colored object"], 12)
  assert ids.dtype == np.int32 and ids.shape == (2, 12)
  eos = tok.convert_tokens_to_ids("<|endoftext|>")
  assert ids.max() == eos and (ids[:, 0] == tok.convert_tokens_to_ids("<|startoftext|>")).all()
  # "a photo of a red dog" is six word tokens: EOS at position 7, which argmax pooling finds.
  assert int(clip.eos_positions(jnp.asarray(ids), None)[0]) == 7
  long = clip.tokenize(tok, ["a " * 40], 12)
  assert long[0, -1] == eos  # truncation keeps the EOS
  with pytest.raises(ValueError, match="tokenizer dir"):
    clip.load_tokenizer(str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match="bare string"):
    clip.tokenize(tok, "a dog", 12)


def test_loading_and_scoring_need_no_torch(tmp_path):
  """The converter, the model and the CLIPScore reward run where ``import torch`` fails."""
  import subprocess
  import sys
  import textwrap

  model = tiny_hf_clip(seed=4, vocab=131, eos=130)  # the tokenizer's size and EOS
  d = str(tmp_path / "ckpt")
  model.save_pretrained(d)
  write_clip_tokenizer(tmp_path)
  code = textwrap.dedent(f"""
      import importlib.machinery, sys
      class NoTorch(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
          return None if name == "torch" or name.startswith("torch.") else super().find_spec(name, path, target)
      sys.meta_path[:] = [NoTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
      import numpy as np
      from htgrpo_jax.models import clip
      from htgrpo_jax.rewards import clip as rewards
      cfg, params = __import__("htgrpo_jax.models.clip_convert", fromlist=["x"]).load_hf_clip({d!r})
      b = rewards.CLIPBundle(cfg, params, clip.load_tokenizer({str(tmp_path)!r}))
      s = rewards.CLIPScore(b, weight=1.0).cosine(["a red dog"], np.zeros((1, 40, 40, 3), np.uint8))
      assert s.shape == (1,) and np.isfinite(s).all()
      assert "torch" not in sys.modules
      print("ok")
      """)
  out = subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      timeout=600,
      env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"},
  )
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_crop_resize_identities():
  """A box already of the output size is copied exactly (PIL's resize and centre crop are no-ops
  then); weights of any box are rows summing to 1 over the pixels inside it."""
  rng = np.random.default_rng(4)
  img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
  # Shortest side already 40: no resize, centre crop of the width at round((50 - 40) / 2) = 5.
  np.testing.assert_array_equal(
      np.asarray(clip_image.crop_resize(img, np.array([0, 0, 50, 40.0]), 40)), img[:, 5:45].astype(np.float32)
  )
  np.testing.assert_array_equal(
      np.asarray(clip_image.crop_resize(img, np.array([7, 3, 39, 35.0]), 32)), img[3:35, 7:39].astype(np.float32)
  )
  wy, wx = clip_image.box_weights(jnp.asarray([7.4, 3.0, 20.6, 35.0]), 40, 50, 24)
  np.testing.assert_allclose(np.asarray(wx).sum(1), 1.0, rtol=1e-6)
  assert np.abs(np.asarray(wx)[:, :7]).max() == 0 and np.abs(np.asarray(wx)[:, 21:]).max() == 0  # box 7..21
  assert np.abs(np.asarray(wy)[:, :3]).max() == 0 and np.abs(np.asarray(wy)[:, 35:]).max() == 0
