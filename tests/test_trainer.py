"""The trainer end to end on the tiny ShapeEval config: outputs, resume, device-count changes,
config errors."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htgrpo_jax import checkpoint, parallel, pretrain, tasks, trainer
from tests.helpers.configs import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("trainer")


@pytest.fixture(scope="module")
def full_run(root):
  """An uninterrupted 4-step run on the 8-device fake mesh (pretrains the tiny base first)."""
  return trainer.train(tiny_config(root, "full"), log=lambda s: None)


def _prompt_log(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["prompts"]) for r in map(json.loads, f)]


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_default_flow_writes_reports_and_updates_the_policy(full_run, root):
  """Four tiny steps show the plumbing, not learning: that the policy improves is tested on the toy
  world (tests/rl/test_learning.py) and measured by the studies (docs/results.md)."""
  wd = full_run["workdir"]
  assert full_run["step"] == 4 and sorted(full_run["evals"]) == [0, 2, 4]
  for name in (
      "results.md",
      "reward_curve.png",
      "grid_step00000.png",
      "grid_step00004.png",
      "eval_step00004.md",
      "config.json",
  ):
    assert os.path.getsize(os.path.join(wd, name)) > 0, name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(wd, "tb")))
  table = open(os.path.join(wd, "results.md")).read()
  assert "| **overall** |" in table and "| base | step 4 |" in table
  log = [json.loads(ln) for ln in open(os.path.join(wd, "metrics.jsonl"))]
  assert [r["step"] for r in log] == [1, 2, 3, 4]
  for r in log:
    assert 0.0 <= r["reward_mean"] <= 1.0 and np.isfinite(r["total/loss"]) and r["skipped"] == 0
    assert len(r["prompts"]) == 4
  # The update moved the policy away from the pretrained base, and nothing became NaN.
  base = pretrain.load_params(str(root / "base" / "params"), checkpoint.abstract_like(full_run["params"]))
  moved = [np.abs(a - b).max() for a, b in zip(_leaves(full_run["params"]), _leaves(base))]
  assert max(moved) > 0 and all(np.isfinite(a).all() for a in _leaves(full_run["params"]))


def test_stopped_and_resumed_run_matches_uninterrupted(full_run, root):
  cfg = tiny_config(root, "resumed")
  first = trainer.train(cfg, log=lambda s: None, stop_after=3)  # checkpoints at 2 and 3
  assert first["step"] == 3
  second = trainer.train(cfg, log=lambda s: None)
  assert second["step"] == 4
  for a, b in zip(_leaves(full_run["params"]), _leaves(second["params"])):
    np.testing.assert_array_equal(a, b)
  assert _prompt_log(full_run["workdir"]) == _prompt_log(second["workdir"])


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_resumes(full_run, root):
  """A real ``kill -9`` of launch/train.py between checkpoints; the restart finishes the run."""
  wd = root / "killed"
  args = [
      sys.executable,
      os.path.join(REPO, "launch", "train.py"),
      "--config=" + os.path.join(REPO, "configs", "geneval.py") + ":htgrpo,tiny",
      f"--config.world.data_dir={root / 'world'}",
      f"--config.model.checkpoint={root / 'base'}",
      f"--config.workdir={wd}",
      "--config.progress=False",
  ]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = wd / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if ckpts.is_dir() and any(p.name == "2" for p in ckpts.iterdir()):
      break
    time.sleep(0.2)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert saved and max(saved) < 4
  out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Resumed" in out.stdout + out.stderr
  assert _prompt_log(full_run["workdir"]) == _prompt_log(str(wd))
  restored = checkpoint.RunCheckpointer(ckpts).restore(checkpoint.abstract_like(full_run["state"]), step=4)[0]
  for a, b in zip(_leaves(full_run["params"]), _leaves(restored.params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # the default run restores a 2-process checkpoint on 1 process (test_multihost.py)
def test_checkpoint_from_8_devices_restores_on_1(full_run, root):
  assert len(jax.devices()) == 8
  cfg = tiny_config(root, "one_device", **{"mesh.num_devices": 1, "eval.at_start": False})
  # Seed the new run's checkpoint folder with the 8-device run's latest checkpoint.
  src = os.path.join(full_run["workdir"], "checkpoints")
  os.makedirs(cfg.workdir)
  subprocess.run(["cp", "-r", src, cfg.workdir], check=True)
  cfg.total_steps = 5
  out = trainer.train(cfg, log=lambda s: None)
  assert out["step"] == 5
  leaf = jax.tree.leaves(out["params"])[0]
  assert len(leaf.sharding.device_set) == 1


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("rl.group_size", 3, "group_size"),
        ("rl.n_global", -1, "HTGRPOConfig.n_global"),
        ("rl.estimator", "bogus", "estimator"),
        ("sampler.rule", "nope", "sampler"),
        ("prompts_per_step", 0, "prompts_per_step"),
        ("optim.learning_rate", -1.0, "optim.learning_rate"),
    ],
)
def test_bad_config_values_fail_before_compiling(root, key, value, match):
  cfg = tiny_config(root, "bad", **{key: value})
  with pytest.raises(ValueError, match=match):
    trainer.train(cfg, log=lambda s: None)
  assert not os.path.exists(os.path.join(cfg.workdir, "checkpoints"))


def test_missing_base_checkpoint_is_named(root):
  cfg = tiny_config(root, "nobase", **{"model.checkpoint": str(root / "absent"), "model.pretrain_if_missing": False})
  with pytest.raises(ValueError, match="model.checkpoint: no base policy at .*absent"):
    trainer.train(cfg, log=lambda s: None)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("eval.batch_size", 12, "eval.batch_size=12 is not a multiple"),
        ("rl.micro_batch_size", 4, r"rl.micro_batch_size=4 is not a multiple of the mesh's data\*fsdp = 8"),
        ("sampler.share_sketch", True, r"sampler.share_sketch=True needs rl.num_sketches >= 2"),
    ],
)
def test_mesh_that_does_not_divide_a_batch_is_named(root, key, value, match):
  cfg = tiny_config(root, "badmesh", **{key: value})  # 8 fake devices, prompts_per_step 4, G 4
  with pytest.raises(ValueError, match=match):
    trainer.train(cfg, log=lambda s: None)
  assert not os.path.exists(os.path.join(cfg.workdir, "checkpoints"))


def test_unknown_key_on_the_command_line_is_named():
  out = subprocess.run(
      [
          sys.executable,
          os.path.join(REPO, "launch", "train.py"),
          "--config=" + os.path.join(REPO, "configs", "geneval.py"),
          "--config.rl.no_such_field=1",
      ],
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert out.returncode != 0 and "no_such_field" in out.stderr


@pytest.mark.parametrize("name", ["mmada_geneval.py", "lumina_dimoo_geneval.py"])
def test_8b_configs_name_missing_paths_before_compiling(tmp_path, name):
  cfg = tasks.load_config_file(os.path.join(REPO, "configs", name))
  cfg.workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match="world.train_prompts: prompt file"):
    trainer.train(cfg, log=lambda s: None)
  for split in ("train", "eval"):
    path = tmp_path / f"{split}.jsonl"
    path.write_text('{"prompt": "a photo of a cat", "tag": "single_object"}\n')
    cfg.world[f"{split}_prompts"] = str(path)
  cfg.model.tokenizer = str(tmp_path / "no_tokenizer")
  with pytest.raises(ValueError, match="model.tokenizer: tokenizer directory .*no_tokenizer"):
    trainer.train(cfg, log=lambda s: None)


# ---- plan(): hierarchical groups, estimator guidance, the sketch window --------------------------


@pytest.mark.parametrize(
    "over,match",
    [
        ({"sampler.share_sketch": True}, r"sampler.share_sketch=True needs rl.num_sketches >= 2"),
        ({"sampler.share_sketch": True, "rl.num_sketches": 4}, r"rl.num_sketches.*at least 2 paints"),
        ({"rl.num_sketches": 2}, r"rl.num_sketches=2 needs sampler.share_sketch=True"),
        ({"sampler.sketch_steps": 3}, r"sampler.sketch_steps=3 .* rl.sketch_fraction=0.5 .* 2 steps"),
        ({"rl.estimator_guidance": "cfg"}, r"HTGRPOConfig.estimator_guidance"),
    ],
)
def test_plan_rejects_inconsistent_groups_and_windows(root, over, match):
  with pytest.raises(ValueError, match=match):
    trainer.plan(tiny_config(root, "plan", **over))


def test_plan_hierarchical_groups_guidance_and_mesh(root):
  p = trainer.plan(
      tiny_config(root, "plan", **{"sampler.share_sketch": True, "rl.num_sketches": 2, "sampler.sketch_steps": 2})
  )
  assert (p.share_sketch, p.rl.num_sketches, p.sampler.sketch_steps) == (True, 2, p.rl.sketch_steps)
  guided = tiny_config(root, "plan").sampler.cfg_scale
  assert guided > 0.0 and p.rollout_sampler == p.sampler and p.sampler.cfg_scale == guided
  # 'unguided_rollouts': training rollouts without CFG, evaluation (p.sampler) keeps it.
  p = trainer.plan(tiny_config(root, "plan", **{"rl.estimator_guidance": "unguided_rollouts"}))
  assert p.rollout_sampler.cfg_scale == 0.0 and p.sampler.cfg_scale == guided
  assert p.rollout_sampler == dataclasses.replace(p.sampler, cfg_scale=0.0)
  # One sketch row per (prompt, sketch): 2 prompts x 2 sketches = 4 rows cannot split over 8 devices.
  p = trainer.plan(
      tiny_config(root, "plan", **{"sampler.share_sketch": True, "rl.num_sketches": 2, "prompts_per_step": 2})
  )
  with pytest.raises(ValueError, match=r"prompts_per_step \* rl.num_sketches = 4 .* sampler.share_sketch"):
    trainer.check_mesh(p, parallel.make_mesh(-1, 1, 1))


def test_rollout_groups_are_prompt_major_then_sketch_then_paint(root):
  """share_sketch with M = 2: P*M sketches branched into G/M paints, rows (prompt, sketch, paint)."""
  from htgrpo_jax.sampling import make_sampler

  # Random-order unmasking: under this near-deterministic table two sketches of a prompt differ in
  # which slots they commit (maskgit would commit the same, most confident, ones).
  over = {"sampler.share_sketch": True, "rl.num_sketches": 2, "sampler.rule": "emerge"}
  p = trainer.plan(tiny_config(root, "plan", **over))
  n, c, pp, g, m = 16, 5, p.prompts_per_step, p.rl.group_size, p.rl.num_sketches
  table = jax.random.normal(jax.random.key(0), (8, n, c))
  table = table.at[:, 0::2].set(jnp.where(jnp.arange(c) == jnp.arange(8)[:, None, None], 30.0, 0.0))
  fn = lambda params, prompt, canvas: params[prompt[:, 0]] + 0.1 * (canvas >= 0)[..., None]
  mesh = parallel.make_mesh(-1, 1, 1)
  sampler = make_sampler(fn, p.rollout_sampler, num_tokens=n, mesh=mesh)
  prompts_np = np.repeat(np.arange(1, pp + 1, dtype=np.int32)[:, None], 2, 1)
  uncond = parallel.global_batch(np.zeros((pp * m, 2), np.int32), mesh)
  rec = trainer.sample_groups(sampler, table, prompts_np, uncond, p, jax.random.key(1), mesh)
  img = np.asarray(rec.image_tokens).reshape(pp, m, g // m, n)
  sk = (np.asarray(rec.commit_step) < p.sampler.sketch_steps).reshape(pp, m, g // m, n)
  assert sk.any() and (~sk).any()
  for i in range(pp):
    for j in range(m):
      assert (sk[i, j] == sk[i, j, :1]).all()  # one sketch per (prompt, sketch) ...
      assert (img[i, j][:, sk[i, j, 0]] == img[i, j, :1][:, sk[i, j, 0]]).all()
      assert len({r.tobytes() for r in img[i, j]}) > 1  # ... painted differently
    assert (img[i, 0][0] != img[i, 1][0]).any()  # the prompt's sketches differ
  # Even slots always draw code (prompt id): row r belongs to prompt r // G (prompt-major).
  np.testing.assert_array_equal(
      img[..., 0::2], np.broadcast_to(np.arange(1, pp + 1)[:, None, None, None], img[..., 0::2].shape)
  )


# Slow: the branching maths is tests/rl/test_hierarchical_groups.py (default run); this is the trainer around it.
@pytest.mark.slow
@pytest.mark.parametrize("guidance", ["guided", "unguided_rollouts"])
def test_branched_rollouts_train_and_log_the_behaviour_gap(root, guidance):
  """One tiny step with 2 sketches x 2 paints per prompt runs end to end, the selectivity and
  behaviour-gap metrics are logged, and with either on-policy choice ('guided' CFG-2 scoring, or
  rollouts without CFG) the behaviour log-probs match the old policy's on the step-0 tokens. (The
  sketch tokens' gradient under branching is tests/rl/test_hierarchical_groups.py's: the tiny base's
  rewards are often all 0, which leaves no advantage to check here.)"""
  cfg = tiny_config(
      root,
      f"branched_{guidance}",
      **{
          "sampler.share_sketch": True,
          "rl.num_sketches": 2,
          "rl.estimator_guidance": guidance,
          "total_steps": 1,
          "eval.at_start": False,
      },
  )
  out = trainer.train(cfg, log=lambda s: None)
  assert out["step"] == 1
  (rec,) = [json.loads(ln) for ln in open(os.path.join(out["workdir"], "metrics.jsonl"))]
  assert rec["skipped"] == 0 and np.isfinite(rec["total/loss"])
  assert 0 < rec["structure_selectivity"] <= 1 and 0 <= rec["structure_all_candidates_frac"] <= 1
  assert rec["behaviour_gap_tokens"] > 0 and rec["behaviour_gap"] < 1e-4, rec["behaviour_gap"]


@pytest.mark.slow
def test_supervised_term_trains_through_the_trainer(root):
  """``rl.ptx_coef`` > 0: one tiny step on the 8-device mesh with the 'guided' estimator (the
  supervised term must train the bare conditional policy, not the guided logits) logs a finite
  masked-token loss of the step's ground-truth images."""
  cfg = tiny_config(
      root,
      "ptx",
      **{"rl.ptx_coef": 0.5, "rl.estimator_guidance": "guided", "total_steps": 1, "eval.at_start": False},
  )
  out = trainer.train(cfg, log=lambda s: None)
  (rec,) = [json.loads(ln) for ln in open(os.path.join(out["workdir"], "metrics.jsonl"))]
  assert rec["skipped"] == 0 and 0 < rec["total/ptx_loss"] < 10, rec["total/ptx_loss"]


def test_supervised_term_needs_ground_truth_in_the_training_batches(root):
  """A task whose batches hold prompts only (the 8B tasks') is refused, naming rl.ptx_coef."""
  cfg = tiny_config(root, "ptx_no_codes", **{"rl.ptx_coef": 0.5})
  task = tasks.build_task(cfg, log=lambda s: None)
  prompts_only = dataclasses.replace(
      task, train_dataset=lambda b, s: task.train_dataset(b, s).map(lambda d: {k: d[k] for k in d if k != "codes"})
  )
  p = trainer.plan(cfg)
  trainer.check_supervised(task, p)  # the ShapeEval batches carry their codes
  with pytest.raises(ValueError, match=r"rl.ptx_coef=0.5 needs ground-truth image tokens \('codes'\)"):
    trainer.check_supervised(prompts_only, p)


# ---- the loop's bookkeeping: itstime, LoopState, profile_steps ----------------------------------


def test_itstime_every_n_and_the_last_step():
  assert [s for s in range(1, 8) if trainer.itstime(s, 3, 7)] == [3, 6, 7]
  assert [s for s in range(1, 8) if trainer.itstime(s, 3, 7, first=True, last=False)] == [1, 3, 6]
  assert [s for s in range(1, 5) if trainer.itstime(s, 0, 4)] == [4]  # every=0: only the last


def test_loop_state_reads_the_json_checkpoints_hold():
  # What checkpoints written before LoopState hold: string step keys, no skip count at step 0.
  old = dict(step=3, seed=7, history=[dict(step=1, reward=0.5)], evals={"0": {"overall": 0.1}})
  loop = trainer.LoopState.from_json(old)
  assert (loop.step, loop.seed, loop.evals, loop.consecutive_skips) == (3, 7, {0: {"overall": 0.1}}, 0)
  assert trainer.LoopState.from_json(json.loads(json.dumps(loop.to_json()))) == loop
  assert loop.to_json()["evals"] == {"0": {"overall": 0.1}}


@pytest.mark.parametrize("value,window", [("", None), ("1,3", (1, 3)), ("0,1", (0, 1))])
def test_profile_steps_window(root, value, window):
  assert trainer.profile_window(tiny_config(root, "plan", profile_steps=value)) == window


@pytest.mark.parametrize("value", ["3,2", "2", "a,b", "-1,2", "1,2,3"])
def test_bad_profile_steps_fail_in_plan(root, value):
  with pytest.raises(ValueError, match="profile_steps="):
    trainer.plan(tiny_config(root, "plan", profile_steps=value))


@pytest.mark.slow
def test_profile_steps_write_a_trace_of_the_window(root):
  cfg = tiny_config(
      root,
      "profiled",
      profile_steps="1,2",
      total_steps=2,
      eval_every=100,
      **{"eval.at_start": False, "eval.final_samples_per_prompt": 1},
  )
  out = trainer.train(cfg, log=lambda s: None)
  assert out["step"] == 2
  traces = [
      os.path.join(d, f)
      for d, _, fs in os.walk(os.path.join(cfg.workdir, "profile"))
      for f in fs
      if f.endswith(".xplane.pb")
  ]
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces

  # Resuming it with another trace window, log level and compilation cache is the same run
  # (workdir.HARMLESS_KEYS): accepted, noted, recorded.
  again = tiny_config(
      root,
      "profiled",
      profile_steps="",
      total_steps=2,
      eval_every=100,
      log_level="warning",
      compilation_cache_dir=str(root / "jax_cache"),
      **{"eval.at_start": False, "eval.final_samples_per_prompt": 1},
  )
  lines = []
  assert trainer.train(again, log=lines.append)["step"] == 2
  note = [ln for ln in lines if ln.startswith("Resuming with changed settings")]
  assert len(note) == 1 and all(
      k in note[0]
      for k in ("profile_steps: '1,2' -> ''", "log_level: 'info' -> 'warning'", "compilation_cache_dir: '' -> ")
  )
  with open(os.path.join(cfg.workdir, "config_history.jsonl")) as f:
    hist = [json.loads(ln) for ln in f]
  assert [h["resuming"] for h in hist] == [False, True]
  assert set(hist[1]["changed"]) == {"profile_steps", "log_level", "compilation_cache_dir"}


def test_trace_log_and_cache_settings_are_not_config_changes(root):
  from htgrpo_jax import workdir

  saved = json.loads(tiny_config(root, "x").to_json_best_effort())
  now = json.loads(
      tiny_config(
          root, "x", profile_steps="3,5", log_level="debug", compilation_cache_dir="/tmp/cache"
      ).to_json_best_effort()
  )
  refused, allowed = workdir.compare_configs(saved, now)
  assert not refused and set(allowed) == {"profile_steps", "log_level", "compilation_cache_dir"}
