"""colour_failures: each held-out colour failure is put in the kind the image shows, read back from an
evaluation folder as training writes it (docs/findings.md, section 14 rests on these counts)."""

import json

import numpy as np
import pytest

from htgrpo_jax import evaluate
from htgrpo_jax.worlds.shapeeval import colour_failures as CF
from htgrpo_jax.worlds.shapeeval import scenes as W
from htgrpo_jax.worlds.shapeeval import verifier as S

Obj = W.ShapeObject
META = {"objects": [{"color": "yellow", "count": 1, "shape": "circle"}], "relation": None, "tag": "colors"}
IMAGES = {  # "a photo of a yellow circle": the image, the judge's verdict, the kind
    "pass": ((Obj("circle", "yellow", 8, 8, 8),), True),
    "no_object": ((Obj("square", "yellow", 8, 8, 8),), False),
    "wrong_colour": ((Obj("circle", "blue", 8, 8, 8),), False),
    "extra_colour": ((Obj("circle", "yellow", 4, 4, 8), Obj("circle", "blue", 20, 20, 8)), False),
}


@pytest.mark.parametrize("want", list(IMAGES))
def test_kind_of_one_image(want):
  objs, correct = IMAGES[want]
  assert CF.kind(correct, "circle", "yellow", S.detect(W.render(W.Scene(objs)))) == want


def test_junk_beside_the_right_object_is_other():
  image = W.render(W.Scene((Obj("circle", "yellow", 8, 8, 8),)))
  image[20:28, 20:24] = W.WorldConfig().rgb("red")  # a 4 x 8 px bar: no world shape
  dets = S.detect(image)
  assert sorted(d.malformed for d in dets) == [False, True]
  assert CF.kind(False, "circle", "yellow", dets) == "other"


def test_tabulate_reads_an_evaluation_folder(tmp_path):
  kinds = ["pass", "wrong_colour", "wrong_colour", "no_object", "extra_colour"]
  images = [W.render(W.Scene(IMAGES[k][0])) for k in kinds]
  res = dict(
      images=np.stack(images),
      prompt_index=np.arange(len(kinds)),
      metas=[json.dumps(META)] * len(kinds),
      captions=["a photo of a yellow circle"] * len(kinds),
      tags=["colors"] * len(kinds),
      strict=np.asarray([IMAGES[k][1] for k in kinds], np.float32),
      reasons=[""] * len(kinds),
      malformed=np.zeros(len(kinds), np.int32),
  )
  evaluate.write_samples(tmp_path, res)
  t = CF.tabulate(str(tmp_path))
  assert t["n"] == 5
  assert t["kinds"] == {"pass": 1, "no_object": 1, "wrong_colour": 2, "extra_colour": 1, "other": 0}
  assert t["drawn"] == {"yellow circle": {"blue": 2}}
  table = CF.markdown({"run": t})
  assert "| run | 5 | 0.200 | 0.200 | 0.400 | 0.200 | 0.000 |" in table


def test_a_folder_without_colour_samples_is_refused(tmp_path):
  (tmp_path / "samples.jsonl").write_text(json.dumps({"tag": "counting"}) + "\n")
  with pytest.raises(ValueError, match="no 'colors' samples"):
    CF.tabulate(str(tmp_path))


def _write(tmp_path, scenes_metas):
  """An evaluation folder of the given (objects, metadata) samples, as training writes it."""
  res = dict(
      images=np.stack([W.render(W.Scene(objs)) for objs, _ in scenes_metas]),
      prompt_index=np.arange(len(scenes_metas)),
      metas=[json.dumps(m) for _, m in scenes_metas],
      captions=["a photo"] * len(scenes_metas),
      tags=[m["tag"] for _, m in scenes_metas],
      strict=np.zeros(len(scenes_metas), np.float32),
      reasons=[""] * len(scenes_metas),
      malformed=np.zeros(len(scenes_metas), np.int32),
  )
  evaluate.write_samples(tmp_path, res)
  return str(tmp_path)


def test_colour_prior_counts_unasked_colours_per_shape(tmp_path):
  two = {"objects": [{"color": None, "count": 2, "shape": "triangle"}], "relation": None, "tag": "counting"}
  one = {"objects": [{"count": 1, "shape": "circle"}], "relation": None, "tag": "single_object"}
  d = _write(
      tmp_path,
      [
          ((Obj("triangle", "red", 4, 4, 8), Obj("triangle", "blue", 20, 20, 8)), two),  # red: held out
          ((Obj("triangle", "blue", 4, 4, 8), Obj("triangle", "blue", 20, 20, 8)), two),
          ((Obj("circle", "yellow", 8, 8, 8), Obj("square", "red", 20, 20, 8)), one),  # square not asked
          ((Obj("circle", "yellow", 8, 8, 8),), META),  # names a colour: not counted
      ],
  )
  t = CF.colour_prior(d)
  assert set(t) == {"triangle", "circle"}
  assert t["triangle"]["n"] == 4 and t["triangle"]["colours"] == {"blue": 3, "red": 1}
  assert t["triangle"]["heldout_share"] == pytest.approx(0.25)  # red of {red, orange}
  assert t["triangle"]["entropy"] == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
  assert t["circle"] == {"n": 1, "colours": {"yellow": 1}, "entropy": 0.0, "heldout_share": 1.0}
  assert "| run | triangle | 4 | 0.562 | 0.250 | blue 0.75, red 0.25 |" in CF.prior_markdown({"run": t})
  # Wrong-colour failures of held-out pairs, against the colours each shape is drawn in unasked.
  tab = {"drawn": {"red triangle": {"blue": 3, "green": 1}, "green circle": {"blue": 2}}}
  assert CF.drawn_in_the_mode(tab, t) == (3, 6)  # triangles' mode is blue, circles' yellow


def test_colour_prior_without_uncoloured_objects_is_refused(tmp_path):
  d = _write(tmp_path, [((Obj("circle", "yellow", 8, 8, 8),), META)])
  with pytest.raises(ValueError, match="no well-formed object on a prompt without colours"):
    CF.colour_prior(d)


def test_two_colour_share_counts_objects_drawn_in_two_colours(tmp_path):
  one = {"objects": [{"color": None, "count": 1, "shape": "square"}], "relation": None, "tag": "single_object"}
  clean = (Obj("square", "blue", 8, 8, 8),)
  d = _write(tmp_path, [(clean, one), (clean, one), (clean, META), (clean, one)])
  split = W.render(W.Scene(clean))
  split[8:16, 12:16] = W.WorldConfig().rgb("red")  # the square's right half in another colour
  from PIL import Image

  Image.fromarray(split).save(tmp_path / "images" / "00001_0.png")
  Image.fromarray(split).save(tmp_path / "images" / "00002_0.png")  # a colour prompt: not counted
  assert CF.two_colour_share(d) == pytest.approx(1 / 3)
  assert CF.two_colour_share(d, uncoloured_only=False) == pytest.approx(2 / 4)
