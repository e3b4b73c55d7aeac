"""Mask schedules and SamplerConfig: validation and the static per-step tables (no compilation)."""

import math

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given

from htgrpo_jax.sampling import SamplerConfig, get_schedule, masked_fractions

NAMES = ("cosine", "linear", "pow2", "pow0.5", "sigmoid")


@pytest.mark.parametrize("name", NAMES)
def test_schedules_go_from_one_to_zero_monotonically(name):
  r = np.linspace(0.0, 1.0, 101)
  g = np.asarray(get_schedule(name)(r))
  assert g[0] == pytest.approx(1.0, abs=1e-12) and g[-1] == pytest.approx(0.0, abs=1e-12)
  assert np.all(np.diff(g) <= 1e-12)
  f = masked_fractions(name, 7)
  assert f.shape == (8,) and f[0] == 1.0 and f[-1] == 0.0


def test_schedule_formulas():
  r = np.array([0.25, 0.5])
  np.testing.assert_allclose(get_schedule("cosine")(r), np.cos(np.pi / 2 * r))
  np.testing.assert_allclose(get_schedule("linear")(r), 1 - r)
  np.testing.assert_allclose(get_schedule("pow3")(r), 1 - r**3)
  np.testing.assert_allclose(get_schedule("sigmoid")(np.array([0.5])), [0.5], atol=1e-12)  # symmetric


@pytest.mark.parametrize("name", ["powx", "pow-1", "pow", "exp", "cos"])
def test_unknown_schedules_raise_naming_the_field(name):
  with pytest.raises(ValueError, match="schedule"):
    get_schedule(name)
  with pytest.raises(ValueError, match="schedule"):
    SamplerConfig(schedule=name)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_steps=12, sketch_steps=13), "sketch_steps"),
        (dict(sketch_steps=0), "sketch_steps"),
        (dict(num_steps=0, sketch_steps=0), "num_steps"),
        (dict(num_steps=True), "num_steps"),
        (dict(num_steps=12.0), "num_steps"),
        (dict(rule="greedy"), "rule"),
        (dict(temperature_mode="annealed"), "temperature_mode"),
        (dict(cfg_scale=-1.0), "cfg_scale"),
        (dict(cfg_scale=float("nan")), "cfg_scale"),
        (dict(temperature=0.0, temperature_mode="constant"), "temperature"),
        (dict(temperature=-1.0, temperature_mode="mmada_annealed"), "temperature"),
    ],
)
def test_bad_config_raises_naming_the_field(kwargs, field):
  with pytest.raises(ValueError, match=f"SamplerConfig.{field}"):
    SamplerConfig(**kwargs)


def test_from_mapping_rejects_unknown_keys_and_ignores_trainer_keys():
  c = SamplerConfig.from_mapping(dict(num_steps=8, sketch_steps=2, share_sketch=True))
  assert (c.num_steps, c.sketch_steps) == (8, 2)
  with pytest.raises(ValueError, match="num_step"):
    SamplerConfig.from_mapping(dict(num_step=8))
  # Equal configs hash equally (they are static jit arguments).
  assert hash(SamplerConfig(cfg_scale=1)) == hash(SamplerConfig(cfg_scale=1.0))
  assert SamplerConfig(temperature=0.0, temperature_mode="mmada_annealed").temperature == 0.0


def test_maskgit_counts_follow_cosine_floor_and_mmada_reference():
  c = SamplerConfig(num_steps=12, sketch_steps=4)
  expect = np.floor(64 * np.cos(np.pi / 2 * np.arange(1, 13) / 12)).astype(int)
  np.testing.assert_array_equal(c.masked_after(64), expect)
  # MMaDA's documented remaining-masked schedule for T=15, N=1024 (its trailing 1 is the slot
  # MMaDA leaves masked but returns sampled anyway; we commit it, hence 0).
  ref = [1018, 1001, 973, 935, 886, 828, 760, 685, 601, 512, 416, 316, 212, 107, 0]
  np.testing.assert_array_equal(SamplerConfig(num_steps=15, sketch_steps=5).masked_after(1024), ref)


@given(n=st.integers(1, 80), t=st.integers(1, 20), name=st.sampled_from(NAMES))
def test_maskgit_counts_are_consistent(n, t, name):
  m = SamplerConfig(num_steps=t, sketch_steps=1, schedule=name).masked_after(n)
  assert m.shape == (t,) and m.dtype == np.int32
  assert m[-1] == 0 and np.all(m >= 0)
  prev = np.concatenate([[n], m[:-1]])
  assert np.all((m < prev) | (prev == 0))  # at least one commit per step while tokens remain
  assert np.all(m <= prev)
  g = masked_fractions(name, t)
  for s in range(t - 1):
    if prev[s] > 1:
      assert m[s] == min(max(math.floor(n * g[s + 1] + 1e-9), 1), prev[s] - 1)


def test_noise_scales_and_emerge_probabilities():
  ann = SamplerConfig(num_steps=4, temperature=2.0, temperature_mode="mmada_annealed")
  np.testing.assert_allclose(ann.noise_scales(), 2.0 * np.cumprod([0.75, 0.5, 0.25, 0.0]))
  assert ann.sample_temperature == 1.0
  const = SamplerConfig(num_steps=4, temperature=0.7, temperature_mode="constant")
  np.testing.assert_allclose(const.noise_scales(), [0.7] * 4)
  assert const.sample_temperature == pytest.approx(0.7)
  # MaskGRPO's expected decodes per step for T=12, N=1024: 8.8, 26, 43, 59, 74, 88, 101, ...
  p = SamplerConfig(num_steps=12, rule="emerge").unmask_probs()
  remaining = 1024 * np.concatenate([[1.0], np.cumprod(1 - p)[:-1]])
  np.testing.assert_allclose((remaining * p)[:7], [8.8, 26, 43, 59, 74, 88, 101], rtol=0.03)
  assert p[-1] == 1.0
  np.testing.assert_allclose((remaining * p).sum(), 1024)
