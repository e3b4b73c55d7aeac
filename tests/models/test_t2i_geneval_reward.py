"""The t2i toy (configs/lumina_dimoo_geneval.py at toy size, as tests/models/test_t2i_task.py) trained
with the registered on-device rewards: the GenEval-style ``geneval_owl`` (a random tiny OWLv2 and
CLIP, HF safetensors + tokenizers written here) and ``clipscore``, through ``config.rewards`` and
``world.score_reward``, and the same reward served by ``launch/reward_server.py`` to a trainer that
uses it as a remote reward."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest
import torch

from htgrpo_jax import tasks, trainer
from htgrpo_jax.models import convert, llada, policy
from htgrpo_jax.rewards import registry

from tests.helpers.clip_torch_reference import save_tiny_clip_dir, save_tiny_owl_dir
from tests.helpers.configs import TINY_LLADA, toy_dimoo_config
from tests.helpers.torch_vq_reference import TVQGAN, VQG, randomize, write_ckpt

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# GenEval records (evaluation_metadata.jsonl's fields) in the toy tokenizer's words.
RECORDS = [
    {"prompt": "a red circle", "tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]},
    {
        "prompt": "two blue square",
        "tag": "counting",
        "include": [{"class": "square", "count": 2}],
        "exclude": [{"class": "square", "count": 3}],
    },
    {
        "prompt": "a green triangle left of a red square",
        "tag": "position",
        "include": [{"class": "square", "count": 1}, {"class": "triangle", "count": 1, "position": ["left of", 0]}],
    },
    {"prompt": "a blue circle", "tag": "single_object", "include": [{"class": "circle", "count": 1}]},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """Tiny random OWLv2 and CLIP dirs (weights + config.json + tokenizer). The OWL class head's shift
  is set to 2 so that on the toy's decoded images the random detector's scores straddle GenEval's
  0.9 (counting) and its positions vary: the dense reward then differs between images of one prompt
  (a constant reward trains nothing)."""
  d_owl, d_clip = tmp_path_factory.mktemp("owl"), tmp_path_factory.mktemp("clip")
  model, _ = save_tiny_owl_dir(d_owl)
  with torch.no_grad():
    model.class_head.logit_shift.bias.fill_(2.0)
  model.save_pretrained(str(d_owl))
  save_tiny_clip_dir(d_clip)
  return str(d_owl), str(d_clip)


def _images(b, seed=0):
  rng = np.random.default_rng(seed)
  return np.repeat(np.repeat(rng.integers(0, 256, (b, 2, 2, 3), dtype=np.uint8), 4, 1), 4, 2)  # 8 x 8


def test_registered_rewards_build_from_config_and_score_the_trainers_columns(models):
  owl_dir, clip_dir = models
  entries = {
      "geneval": dict(kind="geneval_owl", detector=owl_dir, clip=clip_dir, mode="dense"),
      "strict": dict(kind="geneval_owl", detector=owl_dir, clip=clip_dir, mode="strict"),
      "clip": dict(kind="clipscore", checkpoint=clip_dir, scale=2.5, weight=0.5),
  }
  reward = registry.weighted_from_config(entries, world=None, group_size=2)
  prompts = [r["prompt"] for r in RECORDS] * 2
  meta = [json.dumps(r) for r in RECORDS] * 2  # what the trainer passes: the prompt file's lines
  out = reward(prompts, _images(8), meta=meta)
  assert out.shape == (8,) and out.dtype == np.float32 and np.isfinite(out).all()
  comps = {n: reward.specs[n][0](prompts, _images(8), meta=meta) for n in entries}
  assert ((comps["geneval"] >= 0) & (comps["geneval"] <= 1)).all()
  assert np.ptp(comps["geneval"]) > 0
  assert set(np.unique(comps["strict"])) <= {0.0, 1.0}
  assert ((comps["clip"] >= 0) & (comps["clip"] <= 2.5)).all() and np.ptp(comps["clip"]) > 0
  # The weighted sum is the components' (no group_norm): 1 x geneval + 1 x strict + 0.5 x clip.
  np.testing.assert_allclose(out, comps["geneval"] + comps["strict"] + 0.5 * comps["clip"], rtol=1e-5)
  # Data-parallel over the 8 local devices or on one: the same scores.
  one = registry.build_reward("geneval_owl", dict(detector=owl_dir, clip=clip_dir, data_parallel=False), "r")
  np.testing.assert_allclose(one(prompts, _images(8), meta=meta), comps["geneval"], atol=1e-6)

  with pytest.raises(ValueError, match=r"rewards\.g\.clip: required by reward kind 'geneval_owl'"):
    registry.build_reward("geneval_owl", dict(detector=owl_dir), "rewards.g")
  with pytest.raises(ValueError, match=r"rewards\.c \(kind 'clipscore'\): checkpoint='/nope': no such"):
    registry.build_reward("clipscore", dict(checkpoint="/nope"), "rewards.c")
  with pytest.raises(ValueError, match=r"clip_layout='open_clip' needs clip_preset"):
    registry.build_reward("geneval_owl", dict(detector=owl_dir, clip=clip_dir, clip_layout="open_clip"), "r")
  with pytest.raises(ValueError, match=r"nms_iou=2"):
    registry.build_reward("geneval_owl", dict(detector=owl_dir, clip=clip_dir, nms_iou=2), "r")
  with pytest.raises(ValueError, match=r"reward 'geneval'.*meta\[0\] must be a GenEval record"):
    reward.specs["geneval"][0](prompts[:1], _images(1), meta=['{"prompt": "x"}'])


def test_listing_the_rewards_loads_no_model_library():
  # launch/reward_server.py --list and every config load import the registering modules; the
  # tokenizer and checkpoint libraries load only when a reward is built.
  code = (
      "import sys; from htgrpo_jax.rewards import registry; names = registry.load_rewards().names(); "
      "libs = ('transformers', 'torch', 'tokenizers', 'safetensors'); "
      "print(names, sorted(m for m in libs if m in sys.modules))"
  )
  out = subprocess.run(
      [sys.executable, "-c", code],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"),
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "'clipscore'" in out.stdout and "'geneval_owl'" in out.stdout, out.stdout
  assert out.stdout.strip().endswith("[]"), out.stdout


@pytest.mark.parametrize(
    "entry, match",
    [
        (dict(kind=""), r"world.score_reward.kind='': must name a registered reward"),
        (dict(mode="strict"), r"world.score_reward.kind=None: must name a registered reward"),
        (dict(kind="geneval_owl", weight=1.0), r"world.score_reward.weight: the evaluation scorer is one reward"),
    ],
)
def test_score_reward_entry_errors_name_the_key(entry, match):
  c = toy_dimoo_config(workdir="w", prompts=("a", "b"), url="http://h", tokenizer="t", checkpoint="c", vq="v")
  c.world.score_url = ""
  c.world.score_reward = entry
  with pytest.raises(ValueError, match=match):
    tasks.score_reward_entry(c)
  c.world.score_reward = dict(kind="geneval_owl", mode="strict")
  assert tasks.score_reward_entry(c) == ("geneval_owl", {"mode": "strict"})
  c.world.score_url = "http://h/strict"
  with pytest.raises(ValueError, match="world.score_reward: set it or world.score_url"):
    tasks.score_reward_entry(c)


@pytest.fixture(scope="module")
def toy(tmp_path_factory, word_tokenizer_dir):
  """The toy t2i config's files: GenEval-record prompt files, a tiny VQ-GAN and the converted tiny
  backbone; ``make(workdir, url)`` gives the config (reward server at ``url``, or none)."""
  root = tmp_path_factory.mktemp("t2i_owl")
  for name in ("train", "eval"):
    with open(root / f"{name}.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in RECORDS)
  write_ckpt(root / "vqvae.safetensors", randomize(TVQGAN(VQG), seed=7))

  def make(workdir, url=""):
    files = (str(root / "train.jsonl"), str(root / "eval.jsonl"))
    c = toy_dimoo_config(
        workdir=str(root / workdir),
        prompts=files,
        url=url,
        tokenizer=word_tokenizer_dir,
        checkpoint=str(root / "policy"),
        vq=str(root / "vqvae.safetensors"),
    )
    c.world.reward_url = c.world.score_url = ""
    c.rl.beta = 0.0  # the update moves the params only through the rewards' advantages
    c.rl.group_size = 4  # 16 images a step: groups whose images score differently are likely
    return c

  c = make("init")
  layout = tasks.build_layout(c)
  base = jax.device_get(
      policy.init_params(llada.get_config(c.model.preset, **TINY_LLADA), layout, jax.random.PRNGKey(0))
  )
  base = _draws_decodable_codes(base, layout)
  convert.save_params(base, c.model.checkpoint)
  return make, base


def _draws_decodable_codes(params, layout):
  """The random base policy steered to the tiny VQ-GAN's 64 codes (of DiMOO's 8192; the decoder
  clips the rest to code 63, so a random policy draws one image over and over, every image of a
  group scores alike and GRPO has nothing to learn): the mask token's embedding is one large
  coordinate, so a masked slot's final hidden state is about sqrt(d) e_0, and the head's row 0
  raises those 64 codes' logits by about 11."""
  p = jax.tree.map(np.array, params)
  wte, head = p["wte"], p["lm_head"]  # [V, d], [d, V]
  wte[layout.mask_id] = 0.0
  wte[layout.mask_id, 0] = 50.0
  head[0, layout.image_offset : layout.image_offset + VQG.num_vq_embeddings] += 2.0
  return p


def _check_trained(out, base, workdir, names):
  assert out["step"] == 2 and len(out["history"]) == 2
  rewards = [h["reward"] for h in out["history"]]
  assert np.isfinite(rewards).all() and all(0 <= r <= 1 for r in rewards), rewards
  params = jax.device_get(out["params"])
  assert all(np.isfinite(v).all() for v in jax.tree.leaves(params))
  moved = max(
      float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
      for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base))
  )
  assert moved > 0, "the params did not change"
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  for name in names:
    got = [r[f"reward/{name}"] for r in rows if f"reward/{name}" in r]
    assert len(got) == 2 and all(0 <= v <= 1 for v in got), (name, got)
  assert os.path.exists(os.path.join(workdir, "eval_step00002.md"))


@pytest.mark.slow
def test_t2i_toy_trains_with_the_on_device_geneval_reward(models, toy):
  owl_dir, clip_dir = models
  make, base = toy
  c = make("run_owl")
  owl = dict(kind="geneval_owl", detector=owl_dir, clip=clip_dir)
  c.rewards.geneval = dict(owl, mode="dense")
  c.world.score_reward = dict(owl, mode="strict")
  task = tasks.build_task(c)
  assert task.reward.specs["geneval"][0].mode == "dense" and task.judge is not None
  out = trainer.train(c, log=lambda s: None)
  _check_trained(out, base, c.workdir, ["geneval"])
  with open(os.path.join(c.workdir, "eval_step00002.md")) as f:
    assert "overall" in f.read().lower()


def _wait_health(url, proc, deadline_s=300):
  t0 = time.monotonic()
  while time.monotonic() - t0 < deadline_s:
    if proc.poll() is not None:
      raise AssertionError(f"reward server exited {proc.returncode}: {proc.stdout.read()}")
    try:
      with urllib.request.urlopen(url + "/health", timeout=5) as r:
        return json.loads(r.read())
    except OSError:
      time.sleep(1)
  raise AssertionError("reward server never answered /health")


@pytest.mark.slow
def test_t2i_toy_trains_against_the_reward_server_serving_geneval_owl(models, toy):
  owl_dir, clip_dir = models
  make, base = toy
  port = 18000 + os.getpid() % 1000
  opts = f"detector={owl_dir},clip={clip_dir}"
  proc = subprocess.Popen(
      [
          sys.executable,
          "launch/reward_server.py",
          f"--port={port}",
          f"--serve=g=geneval_owl,mode=dense,{opts}",
          f"--serve=strict=geneval_owl,mode=strict,{opts}",
      ],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"),
  )
  try:
    url = f"http://127.0.0.1:{port}"
    assert _wait_health(url, proc)["rewards"] == ["g", "strict"]
    c = make("run_server")
    c.world.reward_url, c.world.score_url = url + "/g", url + "/strict"
    c.rewards.g = dict(kind="world")  # the world's reward (the server), logged as reward/g
    out = trainer.train(c, log=lambda s: None)
    _check_trained(out, base, c.workdir, ["g"])
    health = _wait_health(url, proc)
    assert health["requests"]["g"] >= 2 and health["requests"]["strict"] >= 1, health
    assert health["images"]["g"] >= 32, health  # 2 steps x 4 prompts x G 4
  finally:
    proc.terminate()
    proc.wait(timeout=30)
