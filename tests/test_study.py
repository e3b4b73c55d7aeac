"""Efficacy studies: run planning, per-run configs, the seed x prompt bootstrap, and (slow) a tiny
study end to end."""

import functools
import os

import ml_collections
import numpy as np
import pytest

from htgrpo_jax import evaluate, paths, study, writer
from htgrpo_jax.tasks import load_config_file
from tests.helpers.gcs import SEEN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cfg(monkeypatch):
  monkeypatch.chdir(REPO)
  return load_config_file("configs/study.py")


def test_overrides_parse_as_literals():
  assert study.parse_overrides("rl.beta=0.0; sampler.rule=maskgit ;total_steps=3") == {
      "rl.beta": 0.0,
      "sampler.rule": "maskgit",
      "total_steps": 3,
  }
  with pytest.raises(ValueError, match="key=value"):
    study.parse_overrides("rl.beta")


def test_runs_are_seed_major_so_a_partial_study_is_balanced(cfg):
  cfg.main_arms, cfg.main_seeds = "htgrpo,maskgrpo", 3
  cfg.ablation_arms, cfg.ablation_seeds = "ht_partition_step", 1
  runs = [(r.arm, r.seed) for r in study.plan_runs(cfg)]
  assert runs == [
      ("htgrpo", 0),
      ("maskgrpo", 0),
      ("ht_partition_step", 0),
      ("htgrpo", 1),
      ("maskgrpo", 1),
      ("htgrpo", 2),
      ("maskgrpo", 2),
  ]
  cfg.main_arms = "htgrpo,nope"
  with pytest.raises(ValueError, match="unknown arm 'nope'"):
    study.plan_runs(cfg)


def test_a_study_can_train_and_report_only_some_seeds(cfg):
  """``seeds='1'`` plans (and so trains and reports) seed 1 of every arm and nothing else, e.g. a
  later seed of a study whose seed-0 runs live elsewhere."""
  cfg.main_arms, cfg.main_seeds = "htgrpo,maskgrpo", 3
  cfg.ablation_arms, cfg.ablation_seeds = "ht_partition_step", 1
  cfg.seeds = "1"
  assert [(r.arm, r.seed) for r in study.plan_runs(cfg)] == [("htgrpo", 1), ("maskgrpo", 1)]
  cfg.seeds = "2,0"
  assert [(r.arm, r.seed) for r in study.plan_runs(cfg)] == [
      ("htgrpo", 0),
      ("maskgrpo", 0),
      ("ht_partition_step", 0),
      ("htgrpo", 2),
      ("maskgrpo", 2),
  ]
  cfg.seeds = "one"
  with pytest.raises(ValueError, match="seeds='one'"):
    study.plan_runs(cfg)


def test_every_run_shares_the_frozen_base_and_the_budget(cfg):
  a = study.train_config(cfg, "ht_global_only", 2, "/tmp/x")
  b = study.train_config(cfg, "maskgrpo", 0, "/tmp/y")
  assert a.model.checkpoint == b.model.checkpoint == os.path.join(cfg.workdir, "base")
  assert (a.total_steps, a.prompts_per_step, a.rl.group_size) == (b.total_steps, b.prompts_per_step, b.rl.group_size)
  assert (a.rl.preset, a.rl.n_global, a.rl.n_struct, a.seed) == ("htgrpo", 6, 0, 2)
  assert (b.rl.preset, b.rl.n_global, b.seed, b.eval.at_start) == ("maskgrpo", None, 0, False)
  assert a.eval.seed == b.eval.seed  # one evaluation key: arms are paired
  cfg.arms.htgrpo.overrides = "rl.no_such_knob=1"
  with pytest.raises(ValueError, match="rl.no_such_knob"):
    study.train_config(cfg, "htgrpo", 0, "/tmp/z")


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def test_the_default_command_study_trains_what_the_default_command_trains(monkeypatch):
  """``configs/study.py:default`` measures ``launch/train.py --config=configs/geneval.py`` as shipped:
  its HT-GRPO runs train the shipped config but for the study's bookkeeping (seed, workdir, the frozen
  base, checkpoints), and MaskGRPO runs with the same sampler, budget and evaluation."""
  monkeypatch.chdir(REPO)
  cfg = load_config_file("configs/study.py", "default")
  shipped = _flat(load_config_file("configs/geneval.py").to_dict())
  ht = _flat(study.train_config(cfg, "htgrpo", 1, "/tmp/x").to_dict())
  bookkeeping = {"seed", "workdir", "model.checkpoint", "eval.at_start", "save_every", "keep_checkpoints"}
  # Pretraining pinned to what the shipped file leaves to configs/pretrain_shapes.py, without its
  # wall-clock cap: the base is the 1500-step one.
  bookkeeping |= {"model.pretrain.max_minutes", "model.pretrain.num_steps"}
  assert load_config_file("configs/pretrain_shapes.py").num_steps == 1500
  assert {k for k in shipped.keys() | ht.keys() if shipped.get(k) != ht.get(k)} <= bookkeeping
  assert (ht["sampler.rule"], ht["rl.sketch_context"], ht["model.pretrain.num_steps"]) == (
      "maskgit",
      "trajectory",
      1500,
  )
  mg = _flat(study.train_config(cfg, "maskgrpo", 1, "/tmp/x").to_dict())
  assert {k for k in mg if mg[k] != ht[k]} == {"rl.preset", "rl.sketch_context"}
  assert cfg.reference_arm == "maskgrpo" and cfg.main_arms.split(",") == ["htgrpo", "maskgrpo"]
  long = load_config_file("configs/study.py", "default_long")
  assert long.workdir == cfg.workdir and study.train_config(long, "htgrpo", 1, "/tmp/x").total_steps == 300


def test_the_studies_before_the_switch_keep_the_earlier_default(monkeypatch):
  """Every study but the default command's own ran with the earlier default (emerge at CFG 2, the
  paper's all-mask sketch canvas), so their runs resume and their tables regenerate unchanged."""
  monkeypatch.chdir(REPO)
  import importlib.util

  spec = importlib.util.spec_from_file_location("_study_config", os.path.join(REPO, "configs", "study.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  variants = [v for v in ("",) + mod.VARIANTS if v not in ("tiny",) + mod.OF_THE_DEFAULT]
  assert set(mod.OF_THE_DEFAULT) < set(mod.VARIANTS) and len(variants) >= 7
  for v in variants:
    cfg = load_config_file("configs/study.py", v or None)
    c = study.train_config(cfg, "htgrpo", 0, "/tmp/x")
    assert c.rl.sketch_context is None, v
    if "sampler." not in cfg.shared:
      assert (c.sampler.rule, c.sampler.cfg_scale) == ("emerge", 2.0), v
  earlier = load_config_file("configs/geneval.py", "htgrpo,emerge")
  assert (earlier.sampler.rule, earlier.sampler.cfg_scale, earlier.rl.sketch_context) == ("emerge", 2.0, None)


def _eval(acc, n_prompts=60, samples=4, seed=0):
  r = np.random.default_rng(seed)
  tags = np.repeat(["colors", "counting", "position"], n_prompts // 3 * samples)
  return dict(
      tags=tags,
      prompt_index=np.repeat(np.arange(n_prompts), samples),
      strict=(r.random(n_prompts * samples) < acc).astype(float),
  )


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
  with pytest.raises(RuntimeError, match="base is not scored"):  # workers start after the base
    study.run_study(cfg, shard=(1, 2), log=lambda s: None)
  study.run_study(cfg, max_runs=1, log=lambda s: None)
  assert "| htgrpo | 1 |" in open(cfg.results_md).read()
  # Resumes with two workers' shards (what launch/study.py --workers=2 starts): only maskgrpo is
  # left, so shard 1 has nothing to do and shard 0 trains it; neither writes the report.
  assert study.run_study(cfg, shard=(1, 2), report=False, log=lambda s: None) == ""
  assert "| maskgrpo |" not in open(cfg.results_md).read()
  study.run_study(cfg, shard=(0, 2), report=False, log=lambda s: None)
  md = study.write_report(cfg)
  assert "| htgrpo | 1 |" in md and "| maskgrpo | 1 |" in md and os.path.exists(cfg.curves_png)
  # Each run records where it trained, and the report says so (a GPU study must not read as a CPU one).
  assert f"Trained on: {study.device_name()} (2 runs)." in md
  assert "Base policy: 30 pretraining steps of batch 16 at peak learning rate 0.002 (seed 0), held-out" in md


def test_the_report_says_how_its_base_was_pretrained(tmp_path):
  """Studies from different bases are told apart by the report: the base's recorded recipe and
  held-out loss (``pretrain.json``), and nothing when the base has no record."""
  import json

  cfg = load_config_file("configs/study.py", "tiny")
  cfg.workdir = str(tmp_path / "s")
  assert study.base_recipe_lines(cfg) == []
  os.makedirs(tmp_path / "s" / "base")
  rec = dict(recipe=dict(seed=1, batch_size=32, optim=dict(learning_rate=2e-3)), steps_done=3000, heldout_loss=0.30634)
  (tmp_path / "s" / "base" / "pretrain.json").write_text(json.dumps(rec))
  assert study.base_recipe_lines(cfg)[0] == (
      "Base policy: 3000 pretraining steps of batch 32 at peak learning rate 0.002 (seed 1), "
      "held-out masked-token loss 0.3063."
  )
  rec["made_on"] = dict(device="cpu x1 (AMD EPYC)", jax="0.10.2", jaxlib="0.10.2")
  (tmp_path / "s" / "base" / "pretrain.json").write_text(json.dumps(rec))
  assert study.base_recipe_lines(cfg)[0].endswith("loss 0.3063, made on cpu x1 (AMD EPYC) with JAX 0.10.2.")
  cfg.base_checkpoint = str(tmp_path / "elsewhere")
  assert study.base_recipe_lines(cfg) == []


@pytest.mark.slow
def test_study_workers_split_the_runs_over_processes_and_report_once(tmp_path):
  """``launch/study.py --workers=2``: the parent scores the base, two shard processes train the two
  runs, and the report has both; a rerun finds nothing left to train."""
  import subprocess
  import sys

  wd, md = tmp_path / "study", tmp_path / "r.md"
  cmd = [
      sys.executable,
      "launch/study.py",
      "--config=configs/study.py:tiny",
      "--workers=2",
      f"--config.workdir={wd}",
      f"--config.results_md={md}",
      f"--config.curves_png={tmp_path / 'c.png'}",
      "--config.main_arms=htgrpo,maskgrpo",
      "--config.main_seeds=1",
      "--config.ablation_arms=",
      "--config.progress=False",
  ]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (
      out.stderr.count("0 of 2 runs already finished.") + out.stdout.count("0 of 2 runs already finished.") == 3
  )  # the parent and both shards
  text = md.read_text()
  assert "| htgrpo | 1 |" in text and "| maskgrpo | 1 |" in text
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0 and "2 of 2 runs already finished." in again.stdout + again.stderr


def _eval_res(acc, n_prompts=6, samples=2, seed=0):
  """An ``evaluate.evaluate_policy`` result (tiny images) at strict accuracy ~``acc``."""
  r = np.random.default_rng(seed)
  n = n_prompts * samples
  tags = list(np.repeat(["colors", "counting", "position"], n // 3))
  strict = (r.random(n) < acc).astype(np.float32)
  return dict(
      images=r.integers(0, 255, (n, 4, 4, 3), dtype=np.uint8),
      captions=[f"p{i // samples}" for i in range(n)],
      tags=tags,
      metas=["{}"] * n,
      strict=strict,
      prompt_index=np.repeat(np.arange(n_prompts), samples),
      reasons=[""] * n,
      malformed=np.full(n, -1, np.int64),
      scores=evaluate.tag_scores(tags, strict),
  )


def test_study_report_reads_and_writes_a_url_workdir(bucket):
  """A study under gs://: run folders, evaluations, metrics, the report, the curves and the README
  block all go through ``paths`` (the runs' outputs are written as the trainer's writer does)."""
  cfg = load_config_file(os.path.join(REPO, "configs", "study.py"), "tiny")
  cfg.train_config = os.path.join(REPO, "configs", "geneval.py")
  cfg.workdir = "gs://b/study"
  cfg.results_md, cfg.curves_png = "gs://b/out/results.md", "gs://b/out/curves.png"
  cfg.main_arms, cfg.main_seeds, cfg.ablation_arms = "htgrpo,maskgrpo", 1, ""
  runs = study.plan_runs(cfg)
  assert [r.workdir for r in runs] == ["gs://b/study/htgrpo/seed0", "gs://b/study/maskgrpo/seed0"]
  c = study.train_config(cfg, "htgrpo", 0, runs[0].workdir)
  assert (c.workdir, c.model.checkpoint) == ("gs://b/study/htgrpo/seed0", "gs://b/study/base")
  assert study.write_report(cfg) == ""  # no base evaluation yet

  writer.write_eval(paths.join(cfg.workdir, "base_eval"), "base", _eval_res(0.3), "base", 0)
  for i, r in enumerate(runs):
    for step in (1, 2):
      writer.write_eval(r.workdir, f"step{step:05d}", _eval_res(0.5, seed=10 * i + step), "t", 0)
    log = writer.RunLog(r.workdir, 0, flush_s=3600.0)
    for step in (1, 2):
      log.scalars(step, {"time/step_s": 1.5}, {})
    log.close()
  assert study._step_seconds(runs[0].workdir) == {1: 1.5, 2: 3.0}
  assert [s for s, _ in study._eval_curve(runs[1].workdir)] == [1, 2]
  (bucket / "b/README.md").write_text(f"intro\n{study._BEGIN}\nold\n{study._END}\nrest\n")
  cfg.readme = "gs://b/README.md"
  md = study.write_report(cfg)
  assert "| htgrpo | 1 |" in md and "| maskgrpo | 1 |" in md and "gs://b/study/base" in md
  assert (bucket / "b/out/results.md").read_text() == md
  assert (bucket / "b/out/curves.png").read_bytes()[:4] == b"\x89PNG"
  readme = (bucket / "b/README.md").read_text()
  assert readme.startswith(f"intro\n{study._BEGIN}\n| arm |") and "old" not in readme
  assert readme.endswith(f"{study._END}\nrest\n")
  assert all(p.startswith("gs://b/") for p in SEEN)


def _report_study(tmp_path, arms, seeds, base_acc):
  """The tiny study config over ``arms`` x ``seeds`` in ``tmp_path``, maskgrpo the reference, with
  a base evaluation at strict accuracy ~``base_acc`` (60 prompts x 4 samples)."""
  cfg = load_config_file(os.path.join(REPO, "configs", "study.py"), "tiny")
  cfg.train_config = os.path.join(REPO, "configs", "geneval.py")
  cfg.workdir = str(tmp_path / "study")
  cfg.results_md, cfg.curves_png = str(tmp_path / "r.md"), str(tmp_path / "c.png")
  cfg.main_arms, cfg.main_seeds, cfg.ablation_arms = arms, seeds, ""
  cfg.reference_arm = "maskgrpo"
  writer.write_eval(paths.join(cfg.workdir, "base_eval"), "base", _eval_res(base_acc, 60, 4), "base", 0)
  return cfg


def test_report_gives_each_arm_its_paired_difference_from_the_reference_arm(tmp_path):
  """The ``vs maskgrpo`` column: a clearly better arm's interval lies above 0, one equal to the
  reference straddles 0, and the reference's own row shows '-'."""
  cfg = _report_study(tmp_path, "htgrpo,maskgrpo,uni", 2, base_acc=0.2)
  acc = {"htgrpo": 0.8, "maskgrpo": 0.4, "uni": 0.4}
  for i, r in enumerate(study.plan_runs(cfg)):
    final = study._final_step(study.train_config(cfg, r.arm, r.seed, r.workdir))
    writer.write_eval(r.workdir, final, _eval_res(acc[r.arm], 60, 4, seed=100 + i), "t", 0)
  md = study.write_report(cfg)
  header = next(ln for ln in md.splitlines() if ln.startswith("| arm |"))
  col = header.split(" | ").index("vs maskgrpo")
  table = md[md.index("| arm |") :].split("\n\n")[0].splitlines()
  row = {ln.split(" | ")[0][2:]: ln.split(" | ") for ln in table}
  lo, hi = (float(x) for x in row["htgrpo"][col].split("[")[1].rstrip("]").split(", "))
  assert 0.25 < lo < hi < 0.55
  lo, hi = (float(x) for x in row["uni"][col].split("[")[1].rstrip("]").split(", "))
  assert lo < 0 < hi
  assert row["maskgrpo"][col] == "-"


def test_images_to_reach_interpolates_between_evaluations_and_reports_never():
  curve = np.array([[0, 0.1], [1000, 0.2], [2000, 0.4], [3000, 0.3]])
  assert study.images_to_reach(curve, 0.3) == pytest.approx(1500)
  assert study.images_to_reach(curve, 0.2) == pytest.approx(1000)
  assert study.images_to_reach(curve, 0.05) == 0.0
  assert study.images_to_reach(curve, 0.41) == float("inf")


def test_reach_intervals_read_inf_not_nan_when_draws_are_infinite():
  """Bootstrap draws where the target sits at the base (0 images: an infinite ratio) made numpy's
  interpolation print 'nanx' in docs/results_bs32.md; the bound is inf, and finite bounds are the
  usual linear percentiles."""
  with np.errstate(divide="ignore"):
    ratios = 3840.0 / np.asarray([0.0] * 30 + [400.0 + i for i in range(970)])
  lo, hi = study.interval_with_inf(ratios)
  assert hi == float("inf") and lo == pytest.approx(np.percentile(ratios[30:], 2.5), rel=0.01)
  never = np.asarray([100.0 * i for i in range(900)] + [np.inf] * 100)
  assert study.interval_with_inf(never)[1] == float("inf")
  finite = np.arange(1000.0)
  assert study.interval_with_inf(finite) == tuple(np.percentile(finite, [2.5, 97.5]))


def test_report_says_how_many_rollout_images_each_arm_needs_to_reach_the_reference(tmp_path):
  """An arm evaluated at the same steps that is ahead at every evaluation reaches the reference's
  final score earlier, and the table says how many times fewer images it took."""
  cfg = _report_study(tmp_path, "htgrpo,maskgrpo", 1, base_acc=0.0)
  curve = {"htgrpo": (1.0, 1.0), "maskgrpo": (0.0, 1.0)}  # overall at the two evaluations
  for r in study.plan_runs(cfg):
    c = study.train_config(cfg, r.arm, r.seed, r.workdir)
    for step, acc in zip((c.total_steps // 2, c.total_steps), curve[r.arm]):
      writer.write_eval(r.workdir, f"step{step:05d}", _eval_res(acc, 60, 4), "t", 0)
  # An evaluation past the budget (a longer study training the same runs on) is not this study's.
  ref = [r for r in study.plan_runs(cfg) if r.arm == "maskgrpo"][0]
  writer.write_eval(ref.workdir, f"step{2 * c.total_steps:05d}", _eval_res(0.0, 60, 4), "t", 0)
  # A second htgrpo seed still running (no final evaluation) must not cut the arm's curve short.
  cfg.main_seeds = 2
  running = [r for r in study.plan_runs(cfg) if r.arm == "htgrpo" and r.seed == 1][0]
  writer.write_eval(running.workdir, f"step{c.total_steps // 2:05d}", _eval_res(0.0, 60, 4), "t", 0)
  md = study.write_report(cfg)
  row = next(ln for ln in md.splitlines() if ln.startswith("| htgrpo | ") and "x [" in ln)
  c = study.train_config(cfg, "htgrpo", 0, "")
  per_step = c.prompts_per_step * c.rl.group_size
  # htgrpo reaches maskgrpo's final 1.0 at its first evaluation, half the budget
  half = c.total_steps // 2 * per_step
  assert row.startswith(f"| htgrpo | {half:.0f} [") and row.endswith(" | 2.00x [2.00x, 2.00x] |")


def test_reach_table_says_so_when_the_reference_never_rose_above_the_base(tmp_path):
  """A reference arm that ends at the base's score gives no budget to compare against: one sentence,
  not a table of ``infx [nanx, nanx]``."""
  cfg = _report_study(tmp_path, "htgrpo,maskgrpo", 1, base_acc=0.3)
  for i, r in enumerate(study.plan_runs(cfg)):
    final = study._final_step(study.train_config(cfg, r.arm, r.seed, r.workdir))
    writer.write_eval(r.workdir, final, _eval_res({"htgrpo": 0.8, "maskgrpo": 0.0}[r.arm], 60, 4), "t", 0)
  md = study.write_report(cfg)
  assert "is not above the base's" in md and "nanx" not in md and "infx" not in md


@functools.cache
def _launch_study():
  """launch/study.py as a module, loaded once (it defines absl flags, which a second load would
  define again)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("_launch_study", os.path.join(REPO, "launch", "study.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_study_workers_flag_is_not_passed_on_to_the_shards():
  """Every spelling absl accepts of ``--workers`` is dropped from the shards' argv (a leftover value
  of ``--workers 2`` would be an unexpected positional argument; a leftover flag, nested workers)."""
  mod = _launch_study()
  keep = ["--config=configs/study.py:long", "--max_runs=3", "--config.workdir=w"]
  for workers in (["--workers=4"], ["--workers", "4"], ["-workers=4"], ["-workers", "4"]):
    assert mod.without_workers_flag(keep[:1] + workers + keep[1:]) == keep
  assert mod.without_workers_flag(keep) == keep


def test_study_workers_share_one_gpu_without_preallocating_its_memory():
  """Each shard is a JAX process; JAX's default takes 75 % of a GPU's memory per process, so the
  workers' environment turns that off, unless the user chose a setting."""
  mod = _launch_study()
  assert mod.worker_env({"PATH": "/bin"}) == {"PATH": "/bin", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  assert mod.worker_env({"XLA_PYTHON_CLIENT_PREALLOCATE": "true"})["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"


def test_every_arm_plans(cfg):
  """Each arm's overrides reach a valid training plan (a typo in an arm fails here, not hours into a
  study); the trajectory-context arms set what their names say."""
  from htgrpo_jax import trainer

  main = cfg.main_arms.split(",")
  cfg.ablation_arms = ",".join(a for a in cfg.arms if a not in main)  # every arm any study names
  plans = {arm: trainer.plan(study.train_config(cfg, arm, 0, "/tmp/x")) for arm in cfg.arms}
  ctx = {arm: (p.rl.estimator, p.rl.sketch_context, p.rl.refine_context) for arm, p in plans.items()}
  assert ctx["htgrpo"] == ("htgrpo", "all_mask", "structure")
  assert ctx["ht_traj_context"] == ("htgrpo", "trajectory", "trajectory")
  assert ctx["ht_traj_sketch"] == ("htgrpo", "trajectory", "structure")
  assert ctx["ht_traj_refine"] == ("htgrpo", "all_mask", "trajectory")
  assert plans["ht_cosine"].rl.estimator == "htgrpo" and plans["maskgrpo_cosine"].rl.estimator != "htgrpo"


def test_a_study_can_pretrain_its_base_with_another_batch_and_learning_rate(monkeypatch):
  """The base-recipe comparison (docs/findings.md, section 10) sets the pretraining batch and peak
  learning rate through ``model.pretrain``; the optimizer's other settings stay the file's, and a
  setting the pretraining config does not have is refused by name."""
  from htgrpo_jax.worlds.shapeeval.task import pretrain_config

  monkeypatch.chdir(REPO)
  cfg = load_config_file("configs/study.py", "default")
  cfg.shared += "; model.pretrain.batch_size=32; model.pretrain.num_steps=3000; model.pretrain.optim.learning_rate=1e-3"
  p = pretrain_config(study.train_config(cfg, "htgrpo", 0, "/tmp/x"))
  shipped = load_config_file("configs/pretrain_shapes.py")
  assert (p.batch_size, p.num_steps, p.optim.learning_rate) == (32, 3000, 1e-3)
  assert p.optim.to_dict() == dict(shipped.optim.to_dict(), learning_rate=1e-3)
  c = study.train_config(load_config_file("configs/study.py", "default"), "htgrpo", 0, "/tmp/x")
  assert pretrain_config(c).to_dict() == dict(shipped.to_dict(), workdir=c.model.checkpoint, seed=0, max_minutes=0.0)
  c.model.pretrain.optim = ml_collections.ConfigDict(dict(learning_rat=1e-3))
  with pytest.raises(ValueError, match=r"model.pretrain.optim.learning_rat: not a setting"):
    pretrain_config(c)


def _pooled_study(tmp_path, name, acc, seeds=2):
  """A finished two-arm study (htgrpo, maskgrpo) in ``tmp_path/name`` at final accuracies ``acc``."""
  cfg = _report_study(tmp_path / name, "htgrpo,maskgrpo", seeds, base_acc=0.2)
  for i, r in enumerate(study.plan_runs(cfg)):
    final = study._final_step(study.train_config(cfg, r.arm, r.seed, r.workdir))
    writer.write_eval(r.workdir, final, _eval_res(acc[r.arm], 60, 4, seed=1000 + 10 * ord(name[0]) + i), "t", 0)
  return cfg


def test_pooling_studies_narrows_a_difference_no_single_study_separates(tmp_path):
  """Four small studies with the same true gap (+0.07): most studies' intervals include 0, the
  equal-weight pool over the four excludes it, and the Markdown names every study and the pool."""
  studies = {n: _pooled_study(tmp_path, n, {"htgrpo": 0.37, "maskgrpo": 0.30}) for n in "abcd"}
  res = study.pooled_difference(studies, "htgrpo", "maskgrpo", n_boot=1000)
  widths = {n: np.subtract(*evaluate.interval(r["draws"])[::-1]) for n, r in res["per_study"].items()}
  assert sum(evaluate.interval(r["draws"])[0] < 0 for r in res["per_study"].values()) >= 3
  pooled_lo, pooled_hi = evaluate.interval(res["pooled"]["draws"])
  assert pooled_hi - pooled_lo < min(widths.values())
  assert res["pooled"]["point"] == pytest.approx(np.mean([r["point"] for r in res["per_study"].values()]))
  assert pooled_lo > 0, (pooled_lo, pooled_hi)
  assert set(res["leave_one_out"]) == set("abcd")
  md = study.pooled_report(res, "htgrpo", "maskgrpo")
  assert "| **pooled (equal weight)** |" in md and all(f"| {n} |" in md for n in "abcd")


def test_pooling_refuses_a_study_without_one_of_the_arms(tmp_path):
  ok = _pooled_study(tmp_path, "ok", {"htgrpo": 0.4, "maskgrpo": 0.3})
  half = _report_study(tmp_path / "half", "htgrpo,maskgrpo", 1, base_acc=0.2)
  r = next(r for r in study.plan_runs(half) if r.arm == "htgrpo")
  final = study._final_step(study.train_config(half, r.arm, r.seed, r.workdir))
  writer.write_eval(r.workdir, final, _eval_res(0.4, 60, 4), "t", 0)
  with pytest.raises(ValueError, match="study 'half'.*maskgrpo"):
    study.pooled_difference({"ok": ok, "half": half}, "htgrpo", "maskgrpo", n_boot=100)


def test_compare_evaluations_reports_seed_means_changes_and_the_difference(tmp_path):
  """Evaluations a study did not make (e.g. runs judged with another sampler) get the study's paired
  intervals: point values are the seed means, and a folder on other prompts is refused."""
  import subprocess
  import sys

  tags = ["single_object", "single_object", "counting", "counting"]  # 4 prompts, 1 sample each

  def folder(name, strict, prompts=(0, 1, 2, 3)):
    evaluate.write_samples(
        tmp_path / name,
        dict(
            images=np.zeros((4, 4, 4, 3), np.uint8),
            prompt_index=np.asarray(prompts),
            metas=["{}"] * 4,
            captions=["a photo"] * 4,
            tags=tags,
            strict=np.asarray(strict, np.float32),
            reasons=[""] * 4,
            malformed=np.zeros(4, np.int32),
        ),
    )
    return str(tmp_path / name)

  base = folder("base", [0, 0, 0, 0])
  arms = {"a": [folder("a0", [1, 1, 1, 0]), folder("a1", [1, 0, 1, 1])], "b": [folder("b0", [1, 0, 0, 0])]}
  md = study.compare_evaluations(base, arms, ref="b", n_boot=200)
  # a: overall (mean over tags) 0.75 on each seed; b: 0.25.
  assert "| a | 2 | 0.750 / 0.750 | 0.750 [" in md and "| +0.750 [" in md and "| +0.500 [" in md
  assert "| b | 1 | 0.250 | 0.250 [0.000, 0.500] | +0.250 [+0.000, +0.500] | - |" in md
  with pytest.raises(ValueError, match="ref 'c' is not one of the arms"):
    study.compare_evaluations(base, arms, ref="c")
  with pytest.raises(ValueError, match="holds other prompts or samples than"):
    study.compare_evaluations(base, {"x": [folder("x0", [1, 1, 1, 1], prompts=(0, 1, 2, 4))]})
  out = subprocess.run(
      [sys.executable, "launch/compare_evals.py", f"--base={base}", f"--arm=b:{arms['b'][0]}"],
      capture_output=True,
      text=True,
      check=True,
  ).stdout
  assert "| b | 1 | 0.250 |" in out
