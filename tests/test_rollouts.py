"""Chunked rollouts whose scoring overlaps sampling (``rollouts.collect_rollouts``): the same
Rollout and rewards as scoring each part in turn, in order, with bounded parts in flight, errors
naming the reward; and the weighted, group-normalised reward built from ``config.rewards``."""

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htgrpo_jax import parallel, rollouts, trainer
from htgrpo_jax.rewards import RewardError, WeightedReward, group_normalize
from htgrpo_jax.rewards.registry import weighted_from_config
from htgrpo_jax.sampling import make_sampler
from tests.helpers.configs import tiny_config

N, C = 16, 5  # image tokens, codebook


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("rollouts")


def _toy(root, chunks, in_flight, devices=8, **over):
  """A plan for 4 prompts x G = 4, a table-lookup policy whose logits depend on the prompt and the
  canvas, a jitted decoder (codes -> pixels) and the batch."""
  p = trainer.plan(tiny_config(root, "plan", **{"rollout.chunks": chunks, "rollout.max_in_flight": in_flight, **over}))
  mesh = parallel.make_mesh(-1, 1, 1, num_devices=devices)
  trainer.check_mesh(p, mesh)
  table = jax.random.normal(jax.random.key(0), (8, N, C))
  fn = lambda params, prompt, canvas: params[prompt[:, 0]] + 0.3 * (canvas >= 0)[..., None]
  sampler = make_sampler(fn, p.rollout_sampler, num_tokens=N, mesh=mesh)
  rows = p.chunk_prompts * p.rl.group_size
  uncond = parallel.global_batch(np.zeros((rows, 2), np.int32), mesh)
  decode = jax.jit(
      lambda codes: jnp.broadcast_to((codes.reshape(-1, 4, 4, 1) * 50).astype(jnp.uint8), (codes.shape[0], 4, 4, 3))
  )
  pp = p.prompts_per_step
  batch = {
      "prompt_tokens": np.repeat(np.arange(1, pp + 1, dtype=np.int32)[:, None], 2, 1),
      "caption": np.array([f"prompt {i}" for i in range(pp)]),
      "meta": np.array([f'{{"i": {i}}}' for i in range(pp)]),
  }
  return p, mesh, sampler, uncond, decode, table, batch


class _SlowReward:
  """A host reward recording its calls' captions and how many ran at once. With ``overlap`` the
  first call (part 0) waits until the second has started, so part 0 finishes after later parts
  and the test fails (times out) unless parts are really scored concurrently."""

  name = "slow"

  def __init__(self, overlap=False):
    self.overlap, self.calls, self.active, self.peak = overlap, [], 0, 0
    self.lock, self.second = threading.Lock(), threading.Event()
    self.waited = None

  def __call__(self, prompts, images, meta=None):
    with self.lock:
      i = len(self.calls)
      self.calls.append(list(prompts))
      self.active += 1
      self.peak = max(self.peak, self.active)
    if i == 1:
      self.second.set()
    if self.overlap and i == 0:
      self.waited = self.second.wait(timeout=120)
    with self.lock:
      self.active -= 1
    return images.reshape(len(prompts), -1).mean(1).astype(np.float32) / 255


def _collect(args, reward):
  p, mesh, sampler, uncond, decode, table, batch = args
  return rollouts.collect_rollouts(
      sampler, table, batch, jax.random.key(3), p=p, uncond=uncond, decode=decode, reward=reward, mesh=mesh
  )


def _arrays(rollout):
  return {f.name: np.asarray(getattr(rollout, f.name)) for f in dataclasses.fields(rollout)}


@pytest.mark.parametrize("chunks,devices", [(2, 8), (4, 4)])
def test_overlapped_parts_equal_sequential_parts_exactly_and_in_order(root, chunks, devices):
  seq_reward, ovl_reward = _SlowReward(), _SlowReward(overlap=True)
  seq = _collect(_toy(root, chunks, 0, devices), seq_reward)
  ovl = _collect(_toy(root, chunks, 2, devices), ovl_reward)
  a, b = _arrays(seq[0]), _arrays(ovl[0])
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  np.testing.assert_array_equal(seq[1].rewards, ovl[1].rewards)
  # Order: each part was scored on its own rows, and the result is in prompt-major row order
  # although part 0 (the slowest) finished last.
  g = 4
  want_calls = [
      [f"prompt {i}" for i in range(j * 4 // chunks, (j + 1) * 4 // chunks) for _ in range(g)] for j in range(chunks)
  ]
  assert sorted(ovl_reward.calls) == sorted(want_calls) and seq_reward.calls == want_calls
  assert ovl_reward.waited  # part 0 was still being scored when part 1's scoring began
  assert seq_reward.peak == 1 and ovl_reward.peak == 2  # bounded: never more than max_in_flight
  pixels = np.asarray(_toy(root, chunks, 0, devices)[4](a["image_tokens"]))
  np.testing.assert_allclose(ovl[1].rewards, pixels.reshape(16, -1).mean(1) / 255, rtol=1e-6)
  # The parts are real parts: prompts differ across rows as the batch says (prompt-major).
  np.testing.assert_array_equal(a["prompt_tokens"][:, 0], np.repeat(np.arange(1, 5), g))


def test_one_part_is_the_unchunked_rollout(root):
  """chunks=1 draws exactly what the trainer drew before chunking existed: one sampler call."""
  args = _toy(root, 1, 2)
  p, mesh, sampler, uncond, decode, table, batch = args
  ro, info = _collect(args, _SlowReward())
  rec = trainer.sample_groups(sampler, table, batch["prompt_tokens"], uncond, p, jax.random.key(3), mesh)
  np.testing.assert_array_equal(np.asarray(ro.image_tokens), np.asarray(rec.image_tokens))
  assert info.components == {}


def test_a_failing_part_is_raised_naming_its_reward(root):
  calls = []

  def broken(prompts, images, meta=None):
    calls.append(prompts[0])
    if len(calls) == 2:
      raise ZeroDivisionError("boom")
    return np.zeros(len(prompts), np.float32)

  broken.__name__ = "brittle"
  with pytest.raises(RewardError, match=r"reward 'brittle' failed on rows 8:16: ZeroDivisionError: boom"):
    _collect(_toy(root, 2, 2), broken)
  nan = lambda prompts, images, meta=None: np.full(len(prompts), np.nan, np.float32)
  with pytest.raises(ValueError, match="reward 'nanny': non-finite"):
    _collect(_toy(root, 2, 2), WeightedReward({"nanny": (nan, 1.0, False)}))


def test_weighted_rewards_from_config_normalise_per_group_and_are_logged(root):
  args = _toy(root, 2, 2)
  bright = lambda prompts, images, meta=None: images.reshape(len(prompts), -1).mean(1).astype(np.float32)
  const = lambda prompts, images, meta=None: np.full(len(prompts), 3.0, np.float32)
  reward = WeightedReward({"bright": (bright, 0.5, True), "const": (const, 2.0, False)}, group_size=4)
  ro, info = _collect(args, reward)
  raw = info.components["bright"]
  assert set(info.components) == {"bright", "const"} and (info.components["const"] == 3.0).all()
  np.testing.assert_allclose(info.rewards, 0.5 * group_normalize(raw, 4) + 6.0, rtol=1e-6)
  z = group_normalize(raw, 4).reshape(4, 4)
  np.testing.assert_allclose(z.mean(1), 0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(ro.rewards), info.rewards)


def test_group_normalize_matches_the_definition():
  x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
  g = x[:4]
  np.testing.assert_allclose(group_normalize(x, 4)[:4], (g - g.mean()) / (g.std() + 1e-6), rtol=1e-6)
  np.testing.assert_array_equal(group_normalize(x, 4)[4:], 0.0)  # an all-equal group gives zeros
  with pytest.raises(ValueError, match="not a multiple of group_size=3"):
    group_normalize(x, 3)


def test_config_rewards_are_validated_naming_the_key():
  world = lambda prompts, images, meta=None: np.ones(len(prompts), np.float32)
  r = weighted_from_config(
      {"world": {"weight": 0.5}, "gt": {"kind": "shapeeval", "mode": "strict", "group_norm": True}},
      world=world,
      group_size=4,
  )
  assert r.specs["world"][1:] == (0.5, False) and r.specs["gt"][0].mode == "strict" and r.specs["gt"][2]
  bad = [
      ({"clip": {"kind": "nope"}}, r"rewards\.clip\.kind='nope' must be one of"),
      ({"gt": {"kind": "shapeeval", "weight": float("nan")}}, r"rewards\.gt\.weight=nan"),
      ({"gt": {"kind": "shapeeval", "weight": True}}, r"rewards\.gt\.weight=True"),
      ({"gt": {"kind": "shapeeval", "group_norm": 1}}, r"rewards\.gt\.group_norm=1"),
      ({"gt": {"kind": "shapeeval", "colour": "red"}}, r"rewards\.gt\.colour: not an option"),
      ({"r": {"kind": "remote"}}, r"rewards\.r\.url: required"),
      ({"r": {"kind": "remote", "url": "ftp://x"}}, r"rewards\.r \(kind 'remote'\): .*http://"),
      ({"world": {"kind": "world", "url": "x"}}, r"rewards\.world\.url: kind 'world'"),
      ({"bad-name": {"kind": "world"}}, r"rewards\.bad-name: a reward name"),
      ({"gt": 1.0}, r"rewards\.gt=1\.0: must be a dict"),
  ]
  for entries, match in bad:
    with pytest.raises(ValueError, match=match):
      weighted_from_config(entries, world=world, group_size=4)
  with pytest.raises(ValueError, match=r"rewards\.gt\.group_norm=True needs rl\.group_size >= 2"):
    weighted_from_config({"gt": {"kind": "shapeeval", "group_norm": True}}, world=world, group_size=1)


@pytest.mark.parametrize(
    "over,match",
    [
        ({"rollout.chunks": 3}, r"rollout\.chunks=3: must divide prompts_per_step=4"),
        ({"rollout.chunks": 0}, r"rollout\.chunks=0: must be an int >= 1"),
        ({"rollout.max_in_flight": -1}, r"rollout\.max_in_flight=-1"),
    ],
)
def test_rollout_keys_are_validated_in_the_plan(root, over, match):
  with pytest.raises(ValueError, match=match):
    trainer.plan(tiny_config(root, "plan", **over))


def test_a_part_that_does_not_fill_the_mesh_is_named(root):
  p = trainer.plan(tiny_config(root, "plan", **{"rollout.chunks": 4}))
  with pytest.raises(ValueError, match=r"rollout\.chunks=4: a part of 1 prompts samples 4 rows"):
    trainer.check_mesh(p, parallel.make_mesh(-1, 1, 1))


@pytest.mark.slow
def test_the_trainer_runs_chunked_weighted_rewards_and_logs_each_component(root):
  """One tiny RL step: 2 rollout parts scored while sampling, the world's dense reward plus the
  strict verifier normalised per group, both logged as reward/<name>."""
  import json
  import os

  cfg = tiny_config(root, "weighted", **{"rollout.chunks": 2, "total_steps": 1, "eval.at_start": False})
  cfg.rewards.world = dict(weight=1.0)
  cfg.rewards.gt = dict(kind="shapeeval", mode="strict", weight=0.5, group_norm=True)
  out = trainer.train(cfg, log=lambda s: None)
  assert out["step"] == 1
  (rec,) = [json.loads(ln) for ln in open(os.path.join(out["workdir"], "metrics.jsonl"))]
  assert 0 <= rec["reward/world"] <= 1 and rec["reward/gt"] in np.arange(17) / 16
  assert np.isfinite(rec["total/loss"])


@pytest.mark.slow
def test_two_processes_score_each_part_once_and_hold_the_same_rewards(tmp_path):
  """The multi-host path (2 JAX processes x 2 devices): with 2 overlapped parts per step and a
  reward server among the weighted rewards, the server sees one request per part (process 0's),
  and both processes end with the same params."""
  import json
  import os
  import urllib.request
  from htgrpo_jax import tasks
  from htgrpo_jax.rewards import server
  from tests.helpers import multiprocess

  tasks.build_task(tiny_config(tmp_path, "build"), log=lambda s: None)  # world + base, once
  srv = server.make_server(server.shapeeval_rewards())
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  url = f"http://127.0.0.1:{srv.server_address[1]}"
  try:
    out = multiprocess.run(
        [
            "-m",
            "tests.helpers.train_process",
            str(tmp_path),
            "mh",
            "total_steps=1",
            "eval.at_start=False",
            "rollout.chunks=2",
            "rollout.max_in_flight=2",
            "rewards.world={'weight': 1.0}",
            f"rewards.served={{'kind': 'remote', 'url': '{url}/strict', 'group_norm': True}}",
        ],
        num_processes=2,
        devices_per_process=2,
        timeout=900,
    )
    health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=30).read())
  finally:
    srv.shutdown()
    srv.server_close()
  recs = []
  for code, text in out:
    assert code == 0, text[-5000:]
    recs.append(json.loads([ln for ln in text.splitlines() if ln.startswith("RESULT ")][0][7:]))
  assert recs[0]["step"] == recs[1]["step"] == 1 and recs[0]["checksums"] == recs[1]["checksums"]
  assert health["requests"]["strict"] == 2 and health["images"]["strict"] == 16  # 2 parts of 8
  (rec,) = [json.loads(ln) for ln in open(os.path.join(tmp_path, "mh", "metrics.jsonl"))]
  assert {"reward/world", "reward/served"} <= set(rec)
