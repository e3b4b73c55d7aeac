"""The reward protocol: validation and the weighted combinator."""

import numpy as np
import pytest

from htgrpo_jax.rewards import base
from htgrpo_jax.worlds.shapeeval import grammar as G
from htgrpo_jax.worlds.shapeeval import scenes as W
from htgrpo_jax.worlds.shapeeval.verifier import ShapeEvalReward


def test_validate_rewards_names_the_reward():
  np.testing.assert_array_equal(base.validate_rewards("r", [0.5, 1], 2), [0.5, 1.0])
  assert base.validate_rewards("r", np.ones(3, np.float64), 3).dtype == np.float32
  with pytest.raises(ValueError, match=r"'clip'.*shape \(3,\), expected \(2,\)"):
    base.validate_rewards("clip", np.ones(3, np.float32), 2)
  with pytest.raises(ValueError, match=r"'clip'.*indices \[1\]"):
    base.validate_rewards("clip", np.array([0.0, np.nan], np.float32), 2)
  with pytest.raises(ValueError, match="'clip'.*non-finite"):
    base.validate_rewards("clip", np.array([np.inf, 0.0]), 2)
  with pytest.raises(ValueError, match="'clip'.*dtype"):
    base.validate_rewards("clip", np.array([1, 0]), 2)


def test_weighted_sums_validated_components():
  rng = np.random.default_rng(0)
  ps = G.balanced_prompts("eval", 12)
  imgs = W.render_batch([G.scene_for(p.meta, rng) for p in ps])
  texts = [p.text for p in ps]
  texts[0] = texts[1]  # make one image disagree with its prompt
  strict, dense = ShapeEvalReward(mode="strict"), ShapeEvalReward(mode="dense")
  combo = base.weighted(strict=(strict, 2.0), dense=(dense, 0.5))
  out = combo(texts, imgs)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, 2 * strict(texts, imgs) + 0.5 * dense(texts, imgs))
  parts = combo.components(texts, imgs)
  assert set(parts) == {"strict", "dense"} and parts["strict"].min() == 0.0


def test_weighted_reports_the_bad_component():
  imgs = np.zeros((2, 32, 32, 3), np.uint8)
  nan = lambda prompts, images, **_: np.array([0.0, np.nan])
  short = lambda prompts, images, **_: np.zeros(1, np.float32)
  with pytest.raises(ValueError, match="'nanny'"):
    base.weighted(ok=(lambda p, i, **_: np.zeros(2), 1.0), nanny=(nan, 1.0))(["a", "b"], imgs)
  with pytest.raises(ValueError, match="'short'"):
    base.weighted(short=(short, 1.0))(["a", "b"], imgs)
  with pytest.raises(ValueError, match="'w'.*weight"):
    base.weighted(w=(short, float("nan")))
  with pytest.raises(ValueError, match="'w'"):
    base.weighted(w=short)
  with pytest.raises(ValueError, match="uint8"):
    base.weighted(s=(short, 1.0))(["a", "b"], imgs.astype(np.float32))
