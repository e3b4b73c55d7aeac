"""GenEval-style tables and image grids."""
import numpy as np
import pytest
from PIL import Image

from htgrpo_jax import evaluate as E


def test_overall_is_the_mean_over_tags_not_prompts():
  tags = ["colors"] * 3 + ["position"]
  scores = [1.0, 1.0, 0.0, 1.0]
  acc = E.tag_scores(tags, scores)
  assert acc == {"colors": pytest.approx(2 / 3), "position": 1.0,
                 "overall": pytest.approx((2 / 3 + 1) / 2)}
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
