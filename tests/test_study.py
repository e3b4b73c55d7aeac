"""Efficacy studies: run planning, per-run configs, the seed x prompt bootstrap, and (slow) a tiny
study end to end."""
import os

import numpy as np
import pytest

from htgrpo_jax import study
from htgrpo_jax.tasks import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cfg(monkeypatch):
  monkeypatch.chdir(REPO)
  return load_config_file("configs/study.py")


def test_overrides_parse_as_literals():
  assert study.parse_overrides("rl.beta=0.0; sampler.rule=maskgit ;total_steps=3") == {
      "rl.beta": 0.0, "sampler.rule": "maskgit", "total_steps": 3}
  with pytest.raises(ValueError, match="key=value"):
    study.parse_overrides("rl.beta")


def test_runs_are_seed_major_so_a_partial_study_is_balanced(cfg):
  cfg.main_arms, cfg.main_seeds = "htgrpo,maskgrpo", 3
  cfg.ablation_arms, cfg.ablation_seeds = "ht_partition_step", 1
  runs = [(r.arm, r.seed) for r in study.plan_runs(cfg)]
  assert runs == [("htgrpo", 0), ("maskgrpo", 0), ("ht_partition_step", 0), ("htgrpo", 1),
                  ("maskgrpo", 1), ("htgrpo", 2), ("maskgrpo", 2)]
  cfg.main_arms = "htgrpo,nope"
  with pytest.raises(ValueError, match="unknown arm 'nope'"):
    study.plan_runs(cfg)


def test_every_run_shares_the_frozen_base_and_the_budget(cfg):
  a = study.train_config(cfg, "ht_global_only", 2, "/tmp/x")
  b = study.train_config(cfg, "maskgrpo", 0, "/tmp/y")
  assert a.model.checkpoint == b.model.checkpoint == os.path.join(cfg.workdir, "base")
  assert (a.total_steps, a.prompts_per_step, a.rl.group_size) == (
      b.total_steps, b.prompts_per_step, b.rl.group_size)
  assert (a.rl.preset, a.rl.n_global, a.rl.n_struct, a.seed) == ("htgrpo", 6, 0, 2)
  assert (b.rl.preset, b.rl.n_global, b.seed, b.eval.at_start) == ("maskgrpo", None, 0, False)
  assert a.eval.seed == b.eval.seed  # one evaluation key: arms are paired
  cfg.arms.htgrpo.overrides = "rl.no_such_knob=1"
  with pytest.raises(ValueError, match="rl.no_such_knob"):
    study.train_config(cfg, "htgrpo", 0, "/tmp/z")


def _eval(acc, n_prompts=60, samples=4, seed=0):
  r = np.random.default_rng(seed)
  tags = np.repeat(["colors", "counting", "position"], n_prompts // 3 * samples)
  return dict(tags=tags, prompt_index=np.repeat(np.arange(n_prompts), samples),
              strict=(r.random(n_prompts * samples) < acc).astype(float))


def test_seed_prompt_bootstrap_separates_a_real_gain_and_widens_with_seed_spread():
  base = _eval(0.3)
  good = {k: _eval(0.6, seed=10 + k) for k in range(3)}
  noisy = {0: _eval(0.1, seed=20), 1: _eval(0.7, seed=21), 2: _eval(0.4, seed=22)}
  boot = study.seed_prompt_bootstrap(base, {"good": good, "noisy": noisy})
  lo, hi = np.percentile(boot["good:change"]["overall"], [2.5, 97.5])
  assert 0.15 < lo < hi < 0.45
  width = lambda d: np.subtract(*np.percentile(d, [97.5, 2.5]))
  assert width(boot["noisy"]["overall"]) > 2 * width(boot["good"]["overall"])
  other = dict(good[0], prompt_index=good[0]["prompt_index"][::-1])
  with pytest.raises(ValueError, match="other prompts"):
    study.seed_prompt_bootstrap(base, {"x": {0: other}})


@pytest.mark.slow
def test_tiny_study_end_to_end_resumes_and_reports(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  cfg = load_config_file("configs/study.py", "tiny")
  cfg.workdir = str(tmp_path / "study")
  cfg.results_md, cfg.curves_png = str(tmp_path / "r.md"), str(tmp_path / "c.png")
  cfg.main_arms, cfg.main_seeds, cfg.ablation_arms = "htgrpo,maskgrpo", 1, ""
  cfg.progress = False
  study.run_study(cfg, max_runs=1, log=lambda s: None)
  assert "| htgrpo | 1 |" in open(cfg.results_md).read()
  md = study.run_study(cfg, log=lambda s: None)  # resumes: only maskgrpo is left
  assert "| htgrpo | 1 |" in md and "| maskgrpo | 1 |" in md and os.path.exists(cfg.curves_png)
