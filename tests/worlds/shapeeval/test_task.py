"""The ShapeEval task's reward settings: how hard the dense RL reward punishes malformed junk."""

import math

import numpy as np
import pytest

from htgrpo_jax.rewards.registry import build_reward
from htgrpo_jax.worlds.shapeeval import scenes as W
from htgrpo_jax.worlds.shapeeval import task
from tests.helpers.configs import tiny_config

TEXT = "a photo of a red circle"


def _scene_with_junk():
  """A right scene ("a red circle") and the same scene with one stray 4x4 patch: 16 px of junk."""
  clean = W.render(W.Scene((W.ShapeObject("circle", "red", 8, 8, 8),)), W.WorldConfig())
  junk = clean.copy()
  junk[24:28, 24:28] = W.COLORS["blue"]  # a patch no world shape has: malformed, apart from the circle
  return np.stack([clean, junk])


@pytest.mark.parametrize("half_life", [32.0, 8.0])
def test_junk_half_life_sets_how_hard_the_dense_reward_punishes_junk(half_life):
  """16 px of junk halve the dense reward 16 / half_life times; the clean scene stays 1.0 and the
  strict verdict ignores the setting."""
  imgs = _scene_with_junk()
  build = lambda mode: build_reward("shapeeval", dict(mode=mode, junk_half_life=half_life), "rewards.shapes")
  dense = build("dense")([TEXT] * 2, imgs)
  np.testing.assert_allclose(dense, [1.0, 0.5 ** (16 / half_life)], rtol=1e-6)
  strict = build("strict")([TEXT] * 2, imgs)
  np.testing.assert_array_equal(strict, [1.0, 0.0])


@pytest.mark.parametrize(
    "value, url, match",
    [
        (0.0, "", "want a finite number"),
        (math.nan, "", "want a finite number"),
        (-8.0, "", "want a finite number"),
        (8.0, "http://127.0.0.1:1/dense", "in-process verifier only"),
    ],
)
def test_a_bad_junk_half_life_is_named_before_anything_is_built(tmp_path, value, url, match):
  cfg = tiny_config(tmp_path, "run", **{"world.junk_half_life": value, "world.reward_url": url})
  with pytest.raises(ValueError, match=rf"world.junk_half_life=.*{match}"):
    task.build_shapes_task(cfg, log=lambda s: None)
  assert list(tmp_path.iterdir()) == []  # no world, no base


def test_the_task_trains_on_the_configured_junk_half_life(tmp_path):
  built = task.build_shapes_task(tiny_config(tmp_path, "run", **{"world.junk_half_life": 8.0}), log=lambda s: None)
  imgs = _scene_with_junk()
  np.testing.assert_allclose(built.reward([TEXT] * 2, imgs), [1.0, 0.25], rtol=1e-6)
  np.testing.assert_array_equal(built.score([TEXT] * 2, imgs, None), [1.0, 0.0])
