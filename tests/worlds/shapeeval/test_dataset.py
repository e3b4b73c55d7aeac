"""The TFDS ArrayRecord dataset of (caption, codes, meta) and its grain pipeline."""

import numpy as np
import pytest

from htgrpo_jax.worlds.shapeeval import codebook as patch_vq
from htgrpo_jax.worlds.shapeeval import dataset as D
from htgrpo_jax.worlds.shapeeval import scenes as W
from htgrpo_jax.worlds.shapeeval import text_tokenizer as T
from htgrpo_jax.worlds.shapeeval.verifier import ShapeEvalReward


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return D.build_world(tmp_path_factory.mktemp("world"), num_train=256, num_eval=96)


def test_records_decode_to_scenes_that_match_their_captions(assets):
  src = assets.builder.as_data_source()
  assert len(src["train"]) == 256 and len(src["eval"]) == 96
  rew = ShapeEvalReward(mode="strict")
  for split in ("train", "eval"):
    batch = next(iter(D.make_dataset(assets, split, 48, seed=1)))
    assert batch["codes"].dtype == np.int32 and batch["codes"].shape == (48, 64)
    assert batch["prompt_tokens"].shape == (48, 16)
    imgs = np.asarray(patch_vq.decode(assets.codebook, batch["codes"]))
    scores = rew(list(batch["caption"]), imgs, meta=list(batch["meta"]))
    assert scores.min() == 1.0
    np.testing.assert_array_equal(batch["prompt_tokens"], T.encode_prompts(assets.tokenizer, list(batch["caption"])))


def test_iterator_state_restores_the_stream(assets):
  ds = D.make_dataset(assets, "train", 8, seed=2)
  it = iter(ds)
  for _ in range(40):  # beyond one epoch (32 batches): reshuffled epochs continue
    next(it)
  state = it.get_state()
  want = [next(it)["codes"] for _ in range(3)]
  it2 = iter(ds)
  it2.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(it2)["codes"], w)


def test_rebuild_reuses_the_cache(assets):
  again = D.build_world(assets.data_dir, num_train=256, num_eval=96)
  np.testing.assert_array_equal(np.asarray(again.codebook), np.asarray(assets.codebook))
  with pytest.raises(ValueError, match="num_codes"):
    D.build_world(assets.data_dir, num_codes=64)
  with pytest.raises(ValueError, match="split"):
    D.make_dataset(assets, "test", 8)


def test_a_generator_or_world_change_rebuilds_instead_of_reusing(assets, monkeypatch):
  # Records written by an older scene generator (single-axis relations) must not be reused.
  b = assets.builder
  assert str(b.version) == "2.0.0"
  digest = D.world_digest(W.WorldConfig())
  assert b.builder_config.name.endswith(f"_g{D.GENERATOR_REVISION}w{digest}")
  tfds_dir = assets.data_dir + "/tfds"
  same = D.ShapeEval(num_train=256, num_eval=96, codebook=assets.codebook, data_dir=tfds_dir)
  assert same.data_dir == b.data_dir
  assert D.world_digest(W.WorldConfig(relation_margin=0.2)) != D.world_digest(W.WorldConfig())
  other_world = D.ShapeEval(
      world=W.WorldConfig(min_gap=8), num_train=256, num_eval=96, codebook=assets.codebook, data_dir=tfds_dir
  )
  monkeypatch.setattr(D, "GENERATOR_REVISION", D.GENERATOR_REVISION + 1)
  newer = D.ShapeEval(num_train=256, num_eval=96, codebook=assets.codebook, data_dir=tfds_dir)
  assert len({b.data_dir, other_world.data_dir, newer.data_dir}) == 3


def test_two_processes_building_one_world_at_once_both_get_it(assets):
  """A study's workers start their seeds together and each builds that seed's records in the same
  data_dir: the second must wait and reuse them, not fail renaming its copy onto the first's."""
  import os
  import subprocess
  import sys

  code = (
      "import sys; from htgrpo_jax.worlds.shapeeval import dataset as D; "
      "a = D.build_world(sys.argv[1], seed=7, num_train=256, num_eval=96); "
      "print(len(a.builder.as_data_source()['train']))"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", code, assets.data_dir], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
      )
      for _ in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err.decode()[-2000:]
    assert out.decode().split()[-1] == "256"
