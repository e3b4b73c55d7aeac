"""Named variants are chosen through ``contracts.Registry`` tables, looked up by their config string.

* the registry itself: order, duplicates, and an error that names the config key and the choices;
* every family's table agrees with the tuple its config validates against;
* each dispatch site goes through its table (an unknown name is reported by the registry, a newly
  registered member is reached).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from htgrpo_jax import contracts, rl, tasks
from htgrpo_jax.models import layouts
from htgrpo_jax.models import vq as vq_models
from htgrpo_jax.rl import config as rl_config
from htgrpo_jax.rl import estimators, hierarchy
from htgrpo_jax.sampling import config as sampling_config
from htgrpo_jax.sampling import sampler, schedules


def test_registry_keeps_order_and_names_key_and_choices_on_error():
  reg = contracts.Registry("section.kind")
  assert reg.register("b")(len) is len  # the decorator returns the member unchanged
  reg.register("a")(max)
  assert reg.names() == ("b", "a") and tuple(reg) == ("b", "a") and len(reg) == 2
  assert reg.get("a") is max and "a" in reg and "c" not in reg and ["x"] not in reg
  with pytest.raises(ValueError, match=r"^section\.kind='c' must be one of \('b', 'a'\)$"):
    reg.get("c")
  with pytest.raises(ValueError, match=r"section\.kind=\['x'\] must be one of"):
    reg.get(["x"])  # an unhashable config value is reported, not a TypeError
  with pytest.raises(ValueError, match="section.kind='a' is already registered"):
    reg.register("a")(min)
  assert reg.get("a") is max
  with pytest.raises(ValueError, match="non-empty string"):
    reg.register("")


@pytest.mark.parametrize(
    "registry, allowed",
    [
        (estimators.ESTIMATOR_REGISTRY, rl_config.ESTIMATORS),
        (hierarchy.PARTITION_REGISTRY, rl_config.PARTITION_MODES),
        (hierarchy.UPDATE_SCHEDULE_REGISTRY, rl_config.UPDATE_SCHEDULES),
        (sampler.COMMIT_RULES, sampling_config.RULES),
        (schedules.SCHEDULE_REGISTRY, tuple(n for n in schedules.SCHEDULE_NAMES if n != "pow<k>")),
    ],
    ids=lambda x: getattr(x, "key", None),
)
def test_each_table_matches_what_its_config_accepts(registry, allowed):
  # The configs validate against these tuples before anything is built; a member registered
  # without its name there (or the reverse) would be unreachable or fail at trace time.
  assert registry.names() == tuple(allowed)


def test_other_tables_hold_the_known_variants():
  # The packaged worlds register when tasks.load_worlds (build_task) imports their task modules.
  from htgrpo_jax.worlds.shapeeval import task as shapes_task

  assert tasks.load_worlds() is tasks.WORLDS
  assert tasks.WORLDS.names() == ("t2i", "shapes")
  assert tasks.WORLDS.get("shapes") is shapes_task.build_shapes_task
  assert layouts.LAYOUTS.names() == ("mmada", "dimoo")
  assert vq_models.KINDS.names() == ("magvit2", "vqgan")
  assert vq_models.KINDS.get("vqgan").module is vq_models.vqgan


def _bypass(cfg, **fields):
  """A frozen config with fields set past its validation (what only a direct caller could do)."""
  for k, v in fields.items():
    object.__setattr__(cfg, k, v)
  return cfg


def test_rl_dispatch_reports_unknown_names_through_the_registry():
  cfg = _bypass(rl.preset("htgrpo"), estimator="nope")
  x = jnp.zeros((2, 4), jnp.int32)
  with pytest.raises(ValueError, match=r"HTGRPOConfig\.estimator='nope' must be one of \('htgrpo',"):
    estimators.iteration_canvas(cfg, 0, jax.random.PRNGKey(0), x, x, x > 0)
  with pytest.raises(ValueError, match=r"HTGRPOConfig\.estimator='nope'"):
    estimators.canvas_groups(cfg)
  with pytest.raises(ValueError, match=r"HTGRPOConfig\.update_schedule='nope' must be one of"):
    hierarchy.update_fractions(_bypass(rl.preset("htgrpo"), update_schedule="nope"))
  with pytest.raises(ValueError, match=r"partition mode='nope' must be one of \('entropy', 'step', 'random'\)"):
    hierarchy.partition_tokens(
        x, x.astype(jnp.float32), num_steps=4, sketch_fraction=0.5, structure_ratio=0.5, mode="nope"
    )


def test_sampler_rule_unknown_name_is_reported():
  cfg = _bypass(sampling_config.SamplerConfig(), rule="nope")
  with pytest.raises(ValueError, match=r"SamplerConfig\.rule='nope' must be one of \('maskgit', 'emerge'\)"):
    sampler.make_sampler(lambda p, t, c: None, cfg, num_tokens=4)


def test_schedule_lookup_keeps_the_pow_family():
  assert schedules.get_schedule("cosine") is schedules.cosine
  assert float(schedules.get_schedule("pow2")(0.5)) == 0.75
  with pytest.raises(ValueError, match=r"schedule: unknown 'nope'; choose from \('cosine', 'linear', 'pow<k>'"):
    schedules.get_schedule("nope")


def _t2i_config(tmp_path, **model):
  c = ml_collections.ConfigDict()
  c.world = ml_collections.ConfigDict(dict(kind="t2i"))
  c.model = ml_collections.ConfigDict(dict(tokenizer=str(tmp_path), layout="mmada", image_size=512))
  c.model.update(model)
  return c


def test_world_and_layout_dispatch_go_through_their_tables(tmp_path, monkeypatch):
  c = _t2i_config(tmp_path, layout="sdxl")
  with pytest.raises(ValueError, match=r"model\.layout='sdxl' must be one of \('mmada', 'dimoo'\)"):
    tasks.build_layout(c)
  c.world.kind = "sdxl"
  with pytest.raises(ValueError, match=r"world\.kind='sdxl' must be one of \('t2i', 'shapes'\)"):
    tasks.build_task(c)

  # A newly registered world or layout is reached by its config string (and nothing else is built).
  seen = {}
  monkeypatch.setitem(tasks.WORLDS._members, "sdxl", lambda config, *, log: seen.setdefault("w", config))
  assert tasks.build_task(c) is c
  monkeypatch.setitem(
      layouts.LAYOUTS._members, "sdxl", lambda tok, model_config: ("layout", tok, model_config.image_size)
  )
  assert tasks.build_layout(c) == ("layout", str(tmp_path), 512)


def test_vq_kind_unknown_name_is_reported():
  with pytest.raises(ValueError, match=r"model\.vq_kind='vqvae' must be one of \('magvit2', 'vqgan'\)"):
    vq_models.build_decoder("vqvae", "/nonexistent", (2, 2))


def test_vq_kind_loader_is_called_with_the_family_preset(tmp_path, monkeypatch):
  calls = []
  from htgrpo_jax.models.vq import convert

  monkeypatch.setattr(
      convert, "load_vqgan_params", lambda path, config, *, mesh=None: calls.append((path, config, mesh)) or {"w": 1}
  )
  fn, params = vq_models.build_decoder("vqgan", str(tmp_path), (2, 2), preset="tiny")
  assert params == {"w": 1} and calls == [(str(tmp_path), vq_models.vqgan.PRESETS["tiny"], None)]
  assert dataclasses.is_dataclass(vq_models.KINDS.get("vqgan"))
