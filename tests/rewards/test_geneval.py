"""GenEval's decision rules on hand-made detections: golden values for every rule and edge."""

import pytest

from htgrpo_jax.rewards import geneval as G


def obj(x0, y0, x1, y1, score=1.0, color=None):
  return {"box": (x0, y0, x1, y1), "score": score, **({"color": color} if color else {})}


def sq(x, y, score=1.0, color=None, size=10):
  return obj(x, y, x + size, y + size, score, color)


def meta(tag, include, exclude=()):
  return {"tag": tag, "include": list(include), "exclude": list(exclude), "prompt": "test"}


BUS_RIGHT_OF_TRAIN = meta(
    "position", [{"class": "train", "count": 1}, {"class": "bus", "count": 1, "position": ["right of", 0]}]
)


# ----------------------------------------------------------------------------------- geometry


def test_relative_position_axes_and_image_y_down():
  a, b = (0, 0, 10, 10), (20, 0, 30, 10)
  assert G.relative_position(a, b) == {"left of"}
  assert G.relative_position(b, a) == {"right of"}
  top, bottom = (0, 0, 10, 10), (0, 30, 10, 40)
  assert G.relative_position(top, bottom) == {"above"}
  assert G.relative_position(bottom, top) == {"below"}
  assert G.relative_position(a, a) == frozenset()  # all revised offsets 0: no relation


def test_relative_position_diagonals():
  # offset (-10, -10), revised (-8, -8) / 14.14 = -0.566 on both axes: two relations.
  assert G.relative_position((0, 0, 10, 10), (10, 10, 20, 20)) == {"left of", "above"}
  # 24 px aside and 4 px higher: "left of" only; the single-axis rule would call it "above".
  a, b = (0, 0, 8, 8), (24, 4, 32, 12)
  assert G.relative_position(a, b) == {"left of"}
  # offset (-10, -17.3) at 60 deg: dx = -8 / 19.98 = -0.40, dy = -15.3 / 19.98 = -0.77.
  assert G.relative_position((0, 0, 10, 10), (10, 17.3, 20, 27.3)) == {"above"}


def test_relative_position_dimension_margin():
  # Two 8 px boxes: margin 0.1 * (8 + 8) = 1.6 px per axis. Purely horizontal offset d gives
  # dx = (d - 1.6) / d, which passes 0.5 only for d > 3.2.
  assert G.relative_position((0, 0, 8, 8), (3, 0, 11, 8)) == frozenset()  # dx = 0.467
  assert G.relative_position((0, 0, 8, 8), (4, 0, 12, 8)) == {"left of"}  # dx = 0.6
  # Wider boxes widen the margin: 20 px boxes 4 px apart have revised offset 0: no relation.
  assert G.relative_position((0, 0, 20, 8), (4, 0, 24, 8)) == frozenset()
  assert G.relation_strength((0, 0, 20, 8), (4, 0, 24, 8), "left of") == 0.0
  # Height enters the vertical margin only: same centres as above, tall boxes.
  assert G.relative_position((0, 0, 8, 40), (4, 0, 12, 40)) == {"left of"}
  # relation_strength is the component along the relation; > 0.5 is GenEval's rule.
  assert G.relation_strength((0, 0, 8, 8), (4, 0, 12, 8), "left of") == pytest.approx(0.6)
  assert G.relation_strength((0, 0, 8, 8), (4, 0, 12, 8), "right of") == pytest.approx(-0.6)
  with pytest.raises(ValueError, match="relation"):
    G.relation_strength((0, 0, 1, 1), (2, 2, 3, 3), "near")


def test_diagonal_position_clause_fails_with_genevals_reason():
  m = meta("position", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["above", 0]}])
  v = G.evaluate({"dog": [obj(24, 4, 32, 12)], "cat": [obj(0, 0, 8, 8)]}, m)
  assert not v.correct and v.strict == 0.0
  assert v.reason == "expected cat above target, found left of target"
  v = G.evaluate({"dog": [obj(0, 20, 8, 28)], "cat": [obj(2, 0, 10, 8)]}, m)
  assert v.correct and v.strict == 1.0 and v.dense == 1.0 and v.reason == ""


# ------------------------------------------------------------------------- thresholds and cap


def test_score_thresholds_are_strict_and_tag_dependent():
  single = meta("single_object", [{"class": "cat", "count": 1}])
  assert not G.evaluate({"cat": [sq(0, 0, score=0.3)]}, single).correct  # > 0.3, not >=
  assert G.evaluate({"cat": [sq(0, 0, score=0.31)]}, single).correct
  counting = meta("counting", [{"class": "cat", "count": 2}], [{"class": "cat", "count": 3}])
  two = [sq(0, 0, score=0.95), sq(20, 0, score=0.85)]
  v = G.evaluate({"cat": two}, counting)  # 0.9 for counting: only one cat counts
  assert not v.correct and v.reason == "expected cat>=2, found 1"
  assert G.evaluate({"cat": two}, counting, counting_threshold=0.8).correct
  # A low-scored third cat does not trip the exclude clause either.
  assert G.evaluate({"cat": [sq(0, 0, score=0.95), sq(20, 0, score=0.91), sq(40, 0, score=0.5)]}, counting).correct


def test_at_most_16_objects_per_class():
  many = {"cat": [sq(20 * i, 0, score=0.5 + i / 100) for i in range(20)]}
  v = G.evaluate(
      many, meta("counting", [{"class": "cat", "count": 17}], [{"class": "cat", "count": 18}]), counting_threshold=0.3
  )
  assert not v.correct and v.reason == "expected cat>=17, found 16"
  # The exclude clause sees 16 too: "< 17" holds with 20 detections.
  v = G.evaluate(many, meta("two_object", [{"class": "cat", "count": 1}], [{"class": "cat", "count": 17}]))
  assert v.correct
  # The 16 kept are the highest scores: the colour of the top one decides.
  cats = [sq(0, 0, score=0.4, color="red")] + [sq(20, 0, score=0.5, color="blue")] * 16
  v = G.evaluate({"cat": cats}, meta("colors", [{"class": "cat", "count": 1, "color": "red"}]))
  assert not v.correct
  assert v.reason == "expected red cat>=1, found 0 red; and 1 blue"


# ---------------------------------------------------------------------- include / exclude


def test_includes_are_anded_at_least_count():
  m = meta("two_object", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}])
  assert G.evaluate({"cat": [sq(0, 0)], "dog": [sq(20, 0), sq(40, 0)]}, m).correct  # extras ok
  v = G.evaluate({"cat": [sq(0, 0)]}, m)
  assert not v.correct and v.reason == "expected dog>=1, found 0"
  assert v.dense == pytest.approx(0.5)
  v = G.evaluate({}, m)
  assert v.reason == "expected cat>=1, found 0\nexpected dog>=1, found 0" and v.dense == 0.0


def test_counting_is_include_n_plus_exclude_n_plus_one():
  m = meta("counting", [{"class": "cat", "count": 3}], [{"class": "cat", "count": 4}])
  cats = lambda n: {"cat": [sq(20 * i, 0) for i in range(n)]}
  assert G.evaluate(cats(3), m).correct
  v = G.evaluate(cats(4), m)
  assert not v.correct and v.reason == "expected cat<4, found 4"
  assert v.dense == pytest.approx(0.5)  # count 1, exclude 0
  v = G.evaluate(cats(2), m)
  assert v.reason == "expected cat>=3, found 2" and v.dense == pytest.approx((2 / 3 + 1) / 2)
  # Blank: the exclude clause holds vacuously, but restraint is not credited with nothing drawn.
  v = G.evaluate({}, m)
  assert not v.correct and v.dense == 0.0
  # An exclude clause of a class nobody asked for is credited when it holds.
  v = G.evaluate({}, meta("x", [{"class": "cat", "count": 1}], [{"class": "dog", "count": 1}]))
  assert v.dense == pytest.approx(0.5)


# ------------------------------------------------------------------------------------ colour


def test_colour_is_judged_on_the_top_count_objects():
  m = meta("colors", [{"class": "cat", "count": 1, "color": "red"}])
  hi_red = {"cat": [sq(0, 0, 0.9, "red"), sq(20, 0, 0.5, "blue")]}
  hi_blue = {"cat": [sq(0, 0, 0.5, "red"), sq(20, 0, 0.9, "blue")]}
  assert G.evaluate(hi_red, m).correct
  v = G.evaluate(hi_blue, m)
  assert not v.correct and v.reason == "expected red cat>=1, found 0 red; and 1 blue"
  assert v.dense == pytest.approx(0.5)
  m2 = meta("colors", [{"class": "cat", "count": 2, "color": "red"}])
  three = {"cat": [sq(0, 0, 0.9, "red"), sq(20, 0, 0.8, "blue"), sq(40, 0, 0.7, "red")]}
  v = G.evaluate(three, m2)  # the top two are red and blue
  assert not v.correct and v.reason == "expected red cat>=2, found 1 red; and 1 red, 1 blue"
  assert v.dense == pytest.approx((1 + 0.5) / 2)


def test_colour_probabilities_top_one_is_the_colour():
  m = meta("colors", [{"class": "cat", "count": 1, "color": "green"}])
  probs = {c: 0.05 for c in G.COLORS} | {"green": 0.4}
  assert G.evaluate({"cat": [{"box": (0, 0, 5, 5), "score": 0.9, "color_probs": probs}]}, m).correct
  seq = [0.1] * 10
  seq[G.COLORS.index("white")] = 0.2
  v = G.evaluate({"cat": [{"box": (0, 0, 5, 5), "score": 0.9, "color_probs": seq}]}, m)
  assert not v.correct and v.reason.endswith("1 white")
  o = G.DetectedObject((0, 0, 1, 1), 0.9, "red", tuple(seq))
  assert o.top_color == "red"  # an explicit colour wins over the probabilities


# ---------------------------------------------------------------------------------- position


def test_position_checks_every_found_object_against_every_target():
  v = G.evaluate({"train": [obj(0, 0, 10, 10)], "bus": [obj(20, 0, 30, 10)]}, BUS_RIGHT_OF_TRAIN)
  assert v.correct and [c.kind for c in v.checks] == ["count", "count", "position"]
  v = G.evaluate(
      {"train": [obj(0, 0, 10, 10)], "bus": [obj(20, 0, 30, 10, 0.9), obj(-20, 0, -10, 10, 0.8)]}, BUS_RIGHT_OF_TRAIN
  )
  assert v.correct  # only the top-1 bus is looked at
  m2 = meta("position", [{"class": "train", "count": 2}, {"class": "bus", "count": 1, "position": ["right of", 0]}])
  trains = [obj(0, 0, 10, 10), obj(40, 0, 50, 10)]
  v = G.evaluate({"train": trains, "bus": [obj(20, 0, 30, 10)]}, m2)
  assert not v.correct and v.reason == "expected bus right of target, found left of target"
  assert v.dense == pytest.approx(2 / 3)


def test_position_without_a_target_fails():
  v = G.evaluate({"bus": [obj(20, 0, 30, 10)]}, BUS_RIGHT_OF_TRAIN)
  assert v.reason == "expected train>=1, found 0\nno target for bus to be right of"
  assert v.dense == pytest.approx(1 / 3)  # train count 0, bus count 1, position 0
  # A clause whose own colour fails is not checked for position (and earns nothing for it).
  m = meta(
      "position",
      [{"class": "train", "count": 1}, {"class": "bus", "count": 1, "color": "red", "position": ["right of", 0]}],
  )
  v = G.evaluate({"train": [obj(0, 0, 10, 10)], "bus": [obj(20, 0, 30, 10, color="blue")]}, m)
  assert v.reason == "expected red bus>=1, found 0 red; and 1 blue"
  assert [c.credit for c in v.checks] == [1.0, 1.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------- ties


def test_adversarial_ties_kill_colour_hedging():
  m = meta("colors", [{"class": "circle", "count": 1, "color": "red"}])
  hedge = {"circle": [sq(0, 0, 1.0, "red"), sq(20, 0, 1.0, "blue"), sq(40, 0, 1.0, "green")]}
  assert G.evaluate(hedge, m).correct  # 'first': the red one is listed first
  v = G.evaluate(hedge, m, ties="adversarial")
  assert not v.correct and v.dense == pytest.approx(0.5)
  assert v.reason == (
      "expected red circle>=1, found 0 red of 3 tie-ambiguous candidates; and " "1 red, 1 green, 1 blue"
  )
  # A strictly higher score is no tie.
  assert G.evaluate({"circle": [sq(0, 0, 1.0, "red"), sq(20, 0, 0.9, "blue")]}, m, ties="adversarial").correct
  # Extra objects of the asked colour are fine (GenEval is "at least").
  assert G.evaluate({"circle": [sq(0, 0, 1.0, "red"), sq(20, 0, 1.0, "red")]}, m, ties="adversarial").correct


def test_adversarial_ties_cover_the_16_cap():
  m = meta("colors", [{"class": "circle", "count": 1, "color": "red"}])
  circles = {"circle": [sq(20 * i, 0, 1.0, "red") for i in range(16)] + [sq(400, 0, 1.0, "blue")]}
  assert G.evaluate(circles, m).correct  # 'first' keeps the 16 red ones
  assert not G.evaluate(circles, m, ties="adversarial").correct  # the blue one may survive


def test_adversarial_position_needs_every_tied_pair():
  m = meta("position", [{"class": "train", "count": 1}, {"class": "bus", "count": 1, "position": ["right of", 0]}])
  d = {"train": [obj(0, 0, 10, 10)], "bus": [obj(20, 0, 30, 10), obj(-20, 0, -10, 10)]}
  assert G.evaluate(d, m).correct
  v = G.evaluate(d, m, ties="adversarial")
  assert not v.correct and v.reason == "expected bus right of target, found left of target"


def test_same_class_clauses_of_different_colours():
  # ShapeEval's "a red circle below a green circle" as GenEval metadata.
  m = meta(
      "position",
      [
          {"class": "circle", "count": 1, "color": "green"},
          {"class": "circle", "count": 1, "color": "red", "position": ["below", 0]},
      ],
  )
  green, red = sq(0, 0, color="green"), sq(0, 30, color="red")
  for ties in G.TIES:
    assert G.evaluate({"circle": [green, red]}, m, ties=ties).correct
    assert G.evaluate({"circle": [red, green]}, m, ties=ties).correct  # order does not matter
    v = G.evaluate({"circle": [sq(0, 30, color="green"), sq(0, 0, color="red")]}, m, ties=ties)
    assert v.reason == "expected circle below target, found above target"
  # A circle of a colour no clause asks for is a candidate of both clauses: hedging fails.
  blue = sq(40, 15, color="blue")
  v = G.evaluate({"circle": [green, red, blue]}, m, ties="adversarial")
  assert not v.correct and "expected green circle>=1" in v.reason
  assert "expected red circle>=1" in v.reason
  # Only the colour clauses split the class: an extra green circle is just another green one.
  assert G.evaluate({"circle": [green, red, sq(40, 0, color="green")]}, m, ties="adversarial").correct
  assert G.pool_admits(m, 0, "green") and G.pool_admits(m, 0, "blue")
  assert not G.pool_admits(m, 0, "red") and G.pool_admits(m, 0, None)


# ----------------------------------------------------------------------------------- variants


def test_flow_grpo_variant_exact_counts_and_dense():
  single = meta("single_object", [{"class": "cat", "count": 1}])
  v = G.evaluate({"cat": [sq(0, 0), sq(20, 0)]}, single, variant="flow_grpo")
  assert not v.correct and v.reason == "expected cat==1, found 2" and v.dense == 0.0
  assert G.evaluate({"cat": [sq(0, 0), sq(20, 0)]}, single).correct  # GenEval: at least
  two = meta("counting", [{"class": "cat", "count": 2}], [{"class": "cat", "count": 3}])
  v = G.evaluate({"cat": [sq(20 * i, 0) for i in range(3)]}, two, variant="flow_grpo")
  assert v.dense == pytest.approx((0.5 + 0.0) / 2)  # count 1 - 1/2, exclude fails
  col = meta("colors", [{"class": "cat", "count": 2, "color": "red"}])
  v = G.evaluate({"cat": [sq(0, 0, 0.5, "blue"), sq(20, 0, 0.9, "red")]}, col, variant="flow_grpo")
  assert not v.correct and v.dense == pytest.approx((1 + 0.5) / 2)
  # Every found object is used, not the top-count: a low-scored wrong colour counts.
  col1 = meta("colors", [{"class": "cat", "count": 1, "color": "red"}])
  v = G.evaluate({"cat": [sq(0, 0, 0.9, "red"), sq(20, 0, 0.5, "blue")]}, col1, variant="flow_grpo")
  assert not v.correct and [c.credit for c in v.checks] == [0.0, 0.0]
  # A failing position is one 0 term (Flow-GRPO's code would append a 1.0 after it).
  d = {"train": [obj(0, 0, 10, 10)], "bus": [obj(-20, 0, -10, 10)]}
  v = G.evaluate(d, BUS_RIGHT_OF_TRAIN, variant="flow_grpo")
  assert [c.credit for c in v.checks] == [1.0, 1.0, 0.0] and v.dense == pytest.approx(2 / 3)
  d = {"train": [obj(0, 0, 10, 10)], "bus": [obj(20, 0, 30, 10)]}
  assert G.evaluate(d, BUS_RIGHT_OF_TRAIN, variant="flow_grpo").dense == 1.0


def test_dense_is_one_exactly_when_correct():
  cases = [
      ({"cat": [sq(0, 0)]}, meta("s", [{"class": "cat", "count": 1}])),
      ({"cat": [sq(0, 0)]}, meta("s", [{"class": "cat", "count": 2}])),
      ({}, meta("empty", [])),
      ({"cat": [sq(0, 0, color="red")]}, meta("c", [{"class": "cat", "count": 1, "color": "blue"}])),
  ]
  for d, m in cases:
    for variant in G.VARIANTS:
      for ties in G.TIES:
        v = G.evaluate(d, m, variant=variant, ties=ties)
        assert 0.0 <= v.dense <= 1.0 and (v.dense == 1.0) == v.correct == (v.strict == 1.0)
        assert (v.reason == "") == v.correct


# ------------------------------------------------------------------------------------- inputs


def test_detection_formats_and_bad_inputs():
  m = meta("single_object", [{"class": "cat", "count": 1}])
  for o in (G.DetectedObject((0, 0, 5, 5), 0.9), {"box": [0, 0, 5, 5], "score": 0.9}, [0, 0, 5, 5, 0.9]):
    assert G.evaluate({"cat": [o]}, m).correct
  with pytest.raises(ValueError, match="x0 <= x1"):
    G.evaluate({"cat": [obj(5, 0, 0, 5)]}, m)
  with pytest.raises(ValueError, match="unknown"):
    G.evaluate({"cat": [{"box": (0, 0, 1, 1), "label": 3}]}, m)
  with pytest.raises(ValueError, match="mmdet"):
    G.evaluate({"cat": [[0, 0, 1, 1]]}, m)
  with pytest.raises(ValueError, match="color_probs"):
    G.evaluate({"cat": [{"box": (0, 0, 1, 1), "color_probs": [1.0, 0.0]}]}, m)
  with pytest.raises(ValueError, match="count"):
    G.evaluate({}, meta("x", [{"class": "cat", "count": 0}]))
  with pytest.raises(ValueError, match="earlier include"):
    G.evaluate({}, meta("x", [{"class": "cat", "count": 1, "position": ["left of", 0]}]))
  with pytest.raises(ValueError, match="variant"):
    G.evaluate({}, m, variant="dpg")
  with pytest.raises(ValueError, match="ties"):
    G.evaluate({}, m, ties="random")


def test_summary_scores_average_the_tags():
  tags = ["counting"] * 4 + ["colors"] * 2 + ["position"]
  correct = [1, 1, 0, 0, True, True, 0]
  s = G.summary_scores(tags, correct)
  assert list(s) == ["counting", "colors", "position", "overall"]
  assert s["counting"] == 0.5 and s["colors"] == 1.0 and s["position"] == 0.0
  assert s["overall"] == pytest.approx(0.5)  # mean over tags, not over images (3/7)
  with pytest.raises(ValueError, match="3 tags"):
    G.summary_scores(tags[:3], correct)
