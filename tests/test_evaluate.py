"""GenEval-style tables and image grids."""

import os

import numpy as np
import pytest
from PIL import Image

from htgrpo_jax import evaluate as E


def test_overall_is_the_mean_over_tags_not_prompts():
  tags = ["colors"] * 3 + ["position"]
  scores = [1.0, 1.0, 0.0, 1.0]
  acc = E.tag_scores(tags, scores)
  assert acc == {"colors": pytest.approx(2 / 3), "position": 1.0, "overall": pytest.approx((2 / 3 + 1) / 2)}
  table = E.tag_table(tags, scores)
  lines = table.strip().splitlines()
  assert lines[0].startswith("| ShapeEval") and lines[2] == "| colors | 0.667 | 3 |"
  assert lines[-1] == "| **overall** (mean over tags) | **0.833** | 4 |"


def test_tags_follow_geneval_order():
  acc = E.tag_scores(["position", "single_object", "counting"], [0, 1, 0])
  assert list(acc) == ["single_object", "counting", "position", "overall"]


def test_bad_tables_raise():
  with pytest.raises(ValueError, match="tags"):
    E.tag_scores(["colors"], [1.0, 0.0])
  with pytest.raises(ValueError, match="non-finite"):
    E.tag_scores(["colors"], [np.nan])


def test_image_grid_writes_a_png(tmp_path):
  imgs = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  path = tmp_path / "sub" / "grid.png"
  grid = E.image_grid(imgs, [f"a photo of {i} things" for i in range(5)], path, cols=3, scale=2)
  back = np.asarray(Image.open(path))
  np.testing.assert_array_equal(back, grid)
  assert back.shape[1] == 3 * (64 + 4) and back.shape[0] > 2 * 64
  np.testing.assert_array_equal(back[2:66, 2:66], np.repeat(np.repeat(imgs[0], 2, 0), 2, 1))
  with pytest.raises(ValueError, match="captions"):
    E.image_grid(imgs, ["x"], path)


def test_cluster_bootstrap_treats_a_prompts_samples_as_one_draw():
  """Four samples of one prompt that always agree carry one prompt's worth of information: the
  cluster interval must be about twice as wide as the naive one that counts them as four."""
  r = np.random.default_rng(0)
  per_prompt = (r.random(60) < 0.4).astype(float)
  scores = np.repeat(per_prompt, 4)
  tags = ["colors"] * 240
  clustered = E.interval(E.bootstrap_draws(tags, np.repeat(np.arange(60), 4), [scores])["overall"][0])
  naive = E.interval(E.bootstrap_draws(tags, np.arange(240), [scores])["overall"][0])
  ratio = (clustered[1] - clustered[0]) / (naive[1] - naive[0])
  assert 1.6 < ratio < 2.4, ratio
  assert clustered[0] < scores.mean() < clustered[1]


def test_paired_change_interval_is_tighter_than_the_two_intervals():
  r = np.random.default_rng(1)
  base = (r.random(600) < 0.3).astype(float)
  after = np.where(r.random(600) < 0.1, 1.0, base)  # the same prompts, a few more passes
  tags = np.repeat(E._tag_order(["colors", "position", "counting"]), 200)
  d = E.bootstrap_draws(tags, np.arange(600), [base, after])
  lo, hi = E.interval(d["overall"][1] - d["overall"][0])
  assert 0 < lo < hi  # a consistent gain of ~0.07 is resolved when paired
  a, b = E.interval(d["overall"][0]), E.interval(d["overall"][1])
  assert b[0] < a[1]  # ... while the two unpaired intervals overlap
  assert set(d) == {"counting", "colors", "position", "overall"} and d["overall"].shape == (2, 2000)


def test_write_samples_records_every_image_with_its_verdict(tmp_path):
  import json

  imgs = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  res = dict(
      images=imgs,
      captions=[f"p{i // 2}" for i in range(6)],
      tags=["colors"] * 6,
      metas=['{"tag": "colors"}'] * 6,
      prompt_index=np.repeat(np.arange(3), 2),
      strict=np.array([1, 0, 0, 0, 1, 1], np.float32),
      reasons=["ok"] * 6,
      malformed=np.array([0, 2, 0, 0, 0, 1]),
  )
  path = E.write_samples(tmp_path, res)
  recs = [json.loads(line) for line in open(path)]
  assert [r["filename"] for r in recs[:2]] == ["images/00000_0.png", "images/00000_1.png"]
  assert [r["correct"] for r in recs] == [True, False, False, False, True, True]
  assert recs[0]["metadata"] == {"tag": "colors"} and recs[1]["malformed"] == 2
  for r, img in zip(recs, imgs):
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / r["filename"])), img)
  assert E.hacking_watch(res) == {
      "malformed_share": pytest.approx(2 / 6),
      "malformed_share_accepted": pytest.approx(1 / 3),
  }
  back = E.read_samples(tmp_path)
  np.testing.assert_array_equal(back["images"], imgs)
  np.testing.assert_array_equal(back["prompt_index"], res["prompt_index"])
  np.testing.assert_array_equal(back["strict"], res["strict"])
  np.testing.assert_array_equal(back["malformed"], res["malformed"])
  import subprocess
  import sys

  out = subprocess.run(
      [sys.executable, "launch/diversity.py", f"--eval_dirs={tmp_path}"],
      capture_output=True,
      text=True,
      check=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  ).stdout
  want = E.sample_diversity(imgs, res["prompt_index"])
  assert f"| 6 | 0.500 | {want:.3f} | 0.000 |" in out


def test_sample_diversity_is_zero_for_repeated_pictures_and_counts_differing_pixels():
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  c = a.copy()
  c[0, :2] = a[0, :2] ^ 1  # 2 of a's 16 pixels changed
  same = np.stack([a, a, a, b, b, b])
  idx = np.repeat(np.arange(2), 3)
  assert E.sample_diversity(same, idx) == 0.0
  # prompt 0: pairs (a, c) differ in 2/16 pixels, (a, a) in 0 -> mean 1/24; prompt 1: b vs random images
  d = E.sample_diversity(np.stack([a, a, c, b, b, b]), idx)
  assert d == pytest.approx((2 / 16 * 2 + 0) / 3 / 2)
  assert E.sample_diversity(same[:3], np.arange(3)) is None  # one sample per prompt
  with pytest.raises(ValueError, match="prompt_index"):
    E.sample_diversity(same, idx[:4])
  res = dict(images=np.stack([a, a, c, b, b, b]), prompt_index=idx, malformed=np.zeros(6), strict=np.ones(6))
  assert E.eval_watch(res)["sample_diversity"] == pytest.approx(d)
