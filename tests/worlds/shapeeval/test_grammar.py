"""The prompt grammar, its compositional splits and ground-truth scenes."""

import collections

import numpy as np
import pytest

from htgrpo_jax.worlds.shapeeval import grammar as G
from htgrpo_jax.worlds.shapeeval.scenes import render
from htgrpo_jax.worlds.shapeeval.verifier import ShapeEvalReward, parse_prompt


def test_splits_are_disjoint_and_cover_the_grammar():
  train, ev = G.split_prompts("train"), G.split_prompts("eval")
  assert not {p.text for p in train} & {p.text for p in ev}
  assert len(train) + len(ev) == len(G.all_prompts()) == len({p.text for p in G.all_prompts()})
  assert set(G.tags_of(ev)) == set(G.TAGS)  # every tag is evaluated
  assert set(G.tags_of(train)) == set(G.TAGS) - {"single_object"}


def test_held_out_compositions_never_reach_training():
  for p in G.split_prompts("train"):
    o = p.meta.objects
    if p.meta.tag in ("colors", "color_attr"):
      assert not any((x.color, x.shape) in G.HELDOUT_COLOR_SHAPE for x in o), p.text
    if p.meta.tag == "position":
      assert (o[0].shape, p.meta.relation, o[1].shape) not in G.HELDOUT_RELATIONS, p.text
    if p.meta.tag == "counting":
      assert (o[0].shape, o[0].count) not in G.HELDOUT_COUNTS, p.text
  # ... while each held-out composition is asked for in evaluation.
  ev = G.split_prompts("eval")
  seen = {(x.color, x.shape) for p in ev if p.meta.tag == "colors" for x in p.meta.objects}
  assert seen == set(G.HELDOUT_COLOR_SHAPE)


def test_phrasing_is_geneval_like():
  texts = {p.text for p in G.all_prompts()}
  for t in (
      "a photo of a circle",
      "a photo of a circle and a square",
      "a photo of three triangles",
      "a photo of a red circle",
      "a photo of a blue circle left of a green triangle",
      "a photo of a red circle and a blue square",
      "a photo of an orange square",
  ):
    assert t in texts
  vocab = set(G.vocabulary())
  assert all(w in vocab for t in texts for w in t.split())


def test_metadata_round_trips_through_text_and_json():
  for p in G.all_prompts()[::7]:
    assert parse_prompt(p.text) == p.meta
    assert G.PromptMeta.from_json(p.meta.to_json()) == p.meta


def test_balanced_prompts_cycle_tags():
  ps = G.balanced_prompts("eval", 60, seed=3)
  assert collections.Counter(G.tags_of(ps)) == {t: 10 for t in G.TAGS}
  assert G.balanced_prompts("eval", 60, seed=3) == ps
  with pytest.raises(ValueError, match="split"):
    G.split_prompts("test")


def test_scene_for_satisfies_its_prompt():
  rng, rew = np.random.default_rng(0), ShapeEvalReward(mode="strict")
  ps = G.balanced_prompts("eval", 120, seed=1) + G.balanced_prompts("train", 100, seed=1)
  imgs = np.stack([render(G.scene_for(p.meta, rng)) for p in ps])
  assert rew([p.text for p in ps], imgs).min() == 1.0


def test_geneval_metadata_records():
  meta = {p.text: p.meta for p in G.all_prompts()}
  assert G.geneval_metadata(meta["a photo of three triangles"]) == {
      "tag": "counting",
      "include": [{"class": "triangle", "count": 3}],
      "exclude": [{"class": "triangle", "count": 4}],
      "prompt": "a photo of three triangles",
  }
  # GenEval lists the target first and puts the relation on the object related to it.
  text = "a photo of a blue circle left of a green triangle"
  assert G.geneval_metadata(meta[text]) == {
      "tag": "position",
      "exclude": [],
      "prompt": text,
      "include": [
          {"class": "triangle", "count": 1, "color": "green"},
          {"class": "circle", "count": 1, "color": "blue", "position": ["left of", 0]},
      ],
  }
  text = "a photo of a red circle and a blue square"
  assert G.geneval_metadata(meta[text])["include"] == [
      {"class": "circle", "count": 1, "color": "red"},
      {"class": "square", "count": 1, "color": "blue"},
  ]
  assert G.geneval_metadata(meta["a photo of a circle"]) == {
      "tag": "single_object",
      "include": [{"class": "circle", "count": 1}],
      "exclude": [],
      "prompt": "a photo of a circle",
  }
