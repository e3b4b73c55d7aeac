"""Command lines people copy: every ``python launch/train.py ...`` line in README.md and in the
configs' docstrings parses through the real flags, and every RL / sampler knob is settable."""

import os
import re
import shlex

import pytest

from htgrpo_jax import trainer
from tests.helpers.config_flags import parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_lines() -> list[str]:
  texts = [open(os.path.join(REPO, "README.md")).read()]
  for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
    if name.endswith(".py"):
      texts.append(open(os.path.join(REPO, "configs", name)).read())
  lines = []
  for text in texts:
    text = text.replace("\\\n", " ")
    lines += [m.group(1).split("#")[0].strip() for m in re.finditer(r"python launch/train\.py (--config[^\n`]*)", text)]
  return sorted(set(lines))


@pytest.mark.parametrize("line", _train_lines())
def test_documented_train_command_lines_parse_and_plan(line, monkeypatch):
  monkeypatch.chdir(REPO)
  config = parse(shlex.split(line))
  trainer.plan(config)  # the overrides reach the validated plan (no files or devices touched)


def test_readme_override_example_reaches_the_algorithm(monkeypatch):
  monkeypatch.chdir(REPO)
  config = parse(
      [
          "--config=configs/geneval.py",
          "--config.rl.beta=0",
          "--config.rl.structure_weight=3",
          "--config.rl.partition_mode=step",
      ]
  )
  p = trainer.plan(config)
  assert (p.rl.beta, p.rl.structure_weight, p.rl.partition_mode) == (0.0, 3.0, "step")
  base = trainer.plan(parse(["--config=configs/geneval.py"]))
  # Without the flags the preset's own values stand: the overrides above did the changing.
  assert (base.rl.beta, base.rl.partition_mode, base.rl.structure_weight) == (0.01, "entropy", 2.0)


def test_every_rl_and_sampler_field_is_a_typed_flag(monkeypatch):
  monkeypatch.chdir(REPO)
  config = parse(["--config=configs/geneval.py"])
  import dataclasses
  from htgrpo_jax.rl.config import HTGRPOConfig

  derived = {"group_size", "num_sampler_steps", "num_iterations"}
  names = {f.name for f in dataclasses.fields(HTGRPOConfig)} - derived
  assert names <= set(config.rl.keys()), names - set(config.rl.keys())
  sample = {int: "3", float: "0.5", bool: "true", str: "x"}
  for name in sorted(names):
    kind = {"int": int, "float": float, "str": str, "bool": bool}[
        str(HTGRPOConfig.__dataclass_fields__[name].type).replace(" | None", "").strip()
    ]
    got = getattr(parse(["--config=configs/geneval.py", f"--config.rl.{name}={sample[kind]}"]).rl, name)
    assert isinstance(got, kind) and not (kind is int and isinstance(got, bool)), (name, got)
  for name, value in config.sampler.items():
    assert value is not None, f"sampler.{name} defaults to None: the flag parser cannot type it"


def test_the_base_policys_pretraining_settings_are_command_line_flags(monkeypatch):
  """``model.pretrain.*`` default to None (keep configs/pretrain_shapes.py's value) and still take
  typed command-line overrides, which reach the base policy's pretraining config."""
  from htgrpo_jax.worlds.shapeeval import task

  monkeypatch.chdir(REPO)
  default = task.pretrain_config(parse(["--config=configs/geneval.py"]))
  config = parse(
      [
          "--config=configs/geneval.py",
          "--config.model.pretrain.num_steps=2000",
          "--config.model.pretrain.batch_size=32",
          "--config.model.pretrain.max_minutes=0",
          "--config.model.pretrain.optim.learning_rate=1e-3",
      ]
  )
  p = task.pretrain_config(config)
  assert (p.num_steps, p.batch_size, p.max_minutes, p.optim.learning_rate) == (2000, 32, 0.0, 1e-3)
  assert (default.num_steps, default.batch_size) == (1500, 64)
  with pytest.raises(Exception, match="num_steps"):
    parse(["--config=configs/geneval.py", "--config.model.pretrain.num_steps=many"])
