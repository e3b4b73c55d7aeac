"""The 8B path end to end at toy size: configs/lumina_dimoo_geneval.py with a tiny DiMOO-layout
backbone (Orbax params), a tiny VQ-GAN in the HF key layout, a local tokenizer, JSONL prompt files and
a reward server on 127.0.0.1. Sampled codes decode on device to the pixels the reward client sends."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from htgrpo_jax import export, parallel, tasks, trainer
from htgrpo_jax.contracts import Adapted
from htgrpo_jax.models import convert, llada, lora, policy
from htgrpo_jax.models.vq import vqgan

from tests.helpers import local_server
from tests.helpers.configs import T2I_PROMPTS as PROMPTS
from tests.helpers.configs import TINY_LLADA as TINY
from tests.helpers.configs import toy_dimoo_config
from tests.helpers.llada_checkpoint import write_llada_checkpoint
from tests.helpers.torch_vq_reference import TVQGAN, VQG, randomize, write_ckpt


@pytest.fixture(scope="module")
def dimoo_config(tmp_path_factory, word_tokenizer_dir, server):
  root = tmp_path_factory.mktemp("t2i")
  for name in ("train", "eval"):
    with open(root / f"{name}.jsonl", "w") as f:
      for text, tag in PROMPTS:
        f.write(json.dumps({"prompt": text, "tag": tag}) + "\n")
  write_ckpt(root / "vqvae.safetensors", randomize(TVQGAN(VQG), seed=7))
  url = local_server.url(server)
  c = toy_dimoo_config(
      workdir=str(root / "run"),
      prompts=(str(root / "train.jsonl"), str(root / "eval.jsonl")),
      url=url,
      tokenizer=word_tokenizer_dir,
      checkpoint=str(root / "policy"),
      vq=str(root / "vqvae.safetensors"),
  )
  # The converted backbone: random tiny params written as launch/convert_checkpoint.py writes them.
  layout = tasks.build_layout(c)
  model_cfg = llada.get_config(c.model.preset, **TINY)
  convert.save_params(policy.init_params(model_cfg, layout, jax.random.PRNGKey(0)), c.model.checkpoint)
  return c


def test_rollout_codes_decode_to_the_pixels_the_reward_server_receives(dimoo_config, server):
  task = tasks.build_task(dimoo_config)
  p = trainer.plan(dimoo_config)
  mesh = parallel.make_mesh(**dict(dimoo_config.mesh))
  params = task.load_base_params(policy.abstract_params(task.model_cfg, task.layout, mesh))
  sampler = trainer.make_sampler(
      policy.make_canvas_logits_fn(task.model_cfg, task.layout),
      p.sampler,
      num_tokens=task.layout.num_image_tokens,
      mesh=mesh,
  )
  prompts = parallel.global_batch(task.layout.encode_prompts([t for t, _ in PROMPTS] * 2), mesh)
  uncond = parallel.global_batch(task.layout.unconditional_prompts(8), mesh)
  record = sampler.sample(params, prompts, uncond, jax.random.PRNGKey(1))
  codes = np.asarray(record.image_tokens)
  assert codes.shape == (8, 4) and codes.min() >= 0 and codes.max() < task.layout.codebook_size
  images = parallel.to_host(trainer.jit_decode(task, mesh)(record.image_tokens))
  assert images.shape == (8, 8, 8, 3) and images.dtype == np.uint8  # tiny VQ-GAN: 4 px per code

  # The same pixels, by the model's own route: the DiMOO sequence with its newline rows -> codes
  # (clipped to the tiny decoder's 64 codes, as the decoder clips the layout's 8192).
  seq = np.asarray(task.layout.assemble(prompts, np.minimum(codes, VQG.num_vq_embeddings - 1)))
  start = task.layout.image_positions[0]
  grid = vqgan.strip_newlines(seq[:, start : start + 2 * 3], 2, 2, VQG)
  np.testing.assert_array_equal(images, np.asarray(vqgan.decode(task.decode_params, grid, VQG)))

  before = len(server.requests)
  captions = [t for t, _ in PROMPTS] * 2
  scores = task.reward(captions, images, meta=["{}"] * 8)
  path, body, got = server.requests[before]
  assert path == "/reward" and body["prompts"] == captions
  np.testing.assert_array_equal(np.stack(got), images)  # PNG is lossless: exactly these pixels
  np.testing.assert_allclose(scores, images.reshape(8, -1).mean(-1) / 255.0, rtol=1e-6)


def test_every_t2i_path_may_be_a_gs_url(dimoo_config, bucket, tmp_path, monkeypatch):
  """The 8B path's files in a bucket: world.train_prompts / eval_prompts, model.tokenizer,
  model.vq_checkpoint and model.checkpoint as gs:// URLs (served from a local folder, see
  tests/helpers/gcs.py). The task builds and holds what the local paths give: prompts read through
  epath, the tokenizer and the VQ-GAN through local copies, the backbone handed to Orbax as the
  URL (Orbax reads gs:// through TensorStore, which no folder can stand in for: the directory it
  is given is routed to the bucket folder at its door). Nothing appears under the working dir."""
  import shutil
  import tempfile

  import orbax.checkpoint as ocp

  from tests.helpers.gcs import SEEN

  b = bucket / "b"
  shutil.copytree(dimoo_config.model.tokenizer, b / "tok")
  shutil.copytree(dimoo_config.model.checkpoint, b / "policy")
  shutil.copy(dimoo_config.model.vq_checkpoint, b / "vqvae.safetensors")
  shutil.copy(dimoo_config.world.train_prompts, b / "train.jsonl")
  shutil.copy(dimoo_config.world.eval_prompts, b / "eval.jsonl")
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # local_copy's cache: this test's
  orbax_saw = []

  class Routed(ocp.Checkpointer):

    def restore(self, directory, *a, **k):
      path = os.fspath(directory)
      if "gs:" not in path:  # the local task's
        return super().restore(directory, *a, **k)
      orbax_saw.append(path)
      assert path.startswith("gs://b/"), f"mangled: {path}"
      return super().restore(bucket / path[len("gs://") :], *a, **k)

  monkeypatch.setattr(ocp, "Checkpointer", Routed)
  c = dimoo_config.copy_and_resolve_references()
  c.world.train_prompts, c.world.eval_prompts = "gs://b/train.jsonl", "gs://b/eval.jsonl"
  c.model.tokenizer, c.model.checkpoint = "gs://b/tok", "gs://b/policy"
  c.model.vq_checkpoint = "gs://b/vqvae.safetensors"
  c.workdir = "gs://b/run"
  url_task, local_task = tasks.build_task(c, log=lambda s: None), tasks.build_task(dimoo_config)
  assert url_task.eval_prompts == local_task.eval_prompts
  texts = [t for t, _ in PROMPTS]
  np.testing.assert_array_equal(url_task.layout.encode_prompts(texts), local_task.layout.encode_prompts(texts))
  jax.tree.map(np.testing.assert_array_equal, url_task.decode_params, local_task.decode_params)
  mesh = parallel.make_mesh(**dict(c.mesh))
  abstract = policy.abstract_params(url_task.model_cfg, url_task.layout, mesh)
  jax.tree.map(
      np.testing.assert_array_equal, url_task.load_base_params(abstract), local_task.load_base_params(abstract)
  )
  assert orbax_saw == ["gs://b/policy"]
  assert {"gs://b/train.jsonl", "gs://b/eval.jsonl", "gs://b/tok", "gs://b/vqvae.safetensors"} <= set(SEEN)
  assert all(s.startswith("gs://b/") for s in SEEN)


@pytest.mark.slow  # the t2i trainer end to end; its parts (decode, rewards, URLs) stay in the default run
def test_dimoo_config_trains_two_steps_and_scores_with_the_strict_endpoint(dimoo_config, server):
  out = trainer.train(dimoo_config, log=lambda s: None)
  assert out["step"] == 2 and len(out["history"]) == 2
  paths = [r[0] for r in server.requests]
  assert paths.count("/reward") >= 2 and "/strict" in paths
  assert all(np.isfinite(v).all() for v in jax.tree.leaves(jax.device_get(out["params"])))
  for name in ("results.md", "reward_curve.png", "eval_step00002.md", "metrics.jsonl"):
    assert os.path.exists(os.path.join(dimoo_config.workdir, name)), name
  # Images reached the server at the tiny decoder's size, B = prompts_per_step x G per RL step.
  rl_batches = [imgs for path, _, imgs in server.requests if path == "/reward"]
  assert {len(b) for b in rl_batches[-2:]} == {8} and rl_batches[-1][0].shape == (8, 8, 3)


@pytest.mark.slow
def test_lora_round_trip_convert_train_export_convert(dimoo_config, tmp_path):
  """An HF checkpoint written by torch -> converted -> 2 LoRA RL steps -> launch/export.py's merge and
  HF write -> converted again: the result computes the trained policy's logits (within 1e-5)."""
  c = dimoo_config.copy_and_resolve_references()
  model_cfg = llada.get_config(c.model.preset, **TINY)
  hf = tmp_path / "hf"
  write_llada_checkpoint(hf, model_cfg, seed=3)
  (hf / "config.json").write_text(json.dumps({"architectures": ["LLaDAModelLM"]}))
  convert.convert_checkpoint(str(hf), str(tmp_path / "orbax"), model_cfg)
  c.model.checkpoint = str(tmp_path / "orbax")
  c.workdir = str(tmp_path / "run")
  c.model.lora.update(rank=4, alpha=8.0, dropout=0.0)
  c.optim.learning_rate = 0.05  # adapters that move visibly in two steps
  out = trainer.train(c, log=lambda s: None)
  trained = out["params"]
  assert isinstance(trained, Adapted)

  got = export.export_run(c, str(tmp_path / "export"), hf_dir=str(hf), log=lambda s: None)
  assert got["step"] == 2 and (tmp_path / "export" / "config.json").exists()
  cfg = dataclasses.replace(model_cfg, lora=None)
  exported = convert.load_llada_params(str(tmp_path / "export"), cfg)

  layout = tasks.build_layout(c)
  lora_cfg = llada.get_config(c.model.preset, **TINY, lora=lora.LoraConfig(rank=4, alpha=8.0))
  fn = jax.jit(policy.make_canvas_logits_fn(lora_cfg, layout))
  prompts = np.asarray(layout.encode_prompts([t for t, _ in PROMPTS]))
  canvas = np.array([[-1, -1, -1, -1], [1, -1, 3, -1], [0, 1, 2, 3], [-1, 5, -1, -1]], np.int32)
  want = np.asarray(fn(jax.device_get(trained), prompts, canvas))
  base = np.asarray(fn(jax.device_get(trained.base), prompts, canvas))
  assert np.abs(want - base).max() > 1e-4, "the adapters did not move"
  have = np.asarray(jax.jit(policy.make_canvas_logits_fn(cfg, layout))(exported, prompts, canvas))
  np.testing.assert_allclose(have, want, atol=1e-5, rtol=0)
