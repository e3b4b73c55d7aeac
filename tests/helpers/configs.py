"""The tiny training config the trainer tests run, under a test's tmp folder."""

import os

from htgrpo_jax import tasks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(root, name, **over):
  """``configs/geneval.py:htgrpo,tiny`` with its world, base and workdir under ``root`` and the
  dotted ``over`` keys (``**{"rl.beta": 0.0}``) set."""
  cfg = tasks.load_config_file(os.path.join(REPO, "configs", "geneval.py"), "htgrpo,tiny")
  cfg.world.data_dir = str(root / "world")
  cfg.model.checkpoint = str(root / "base")
  cfg.workdir = str(root / name)
  cfg.progress = False
  return set_keys(cfg, **over)


def set_keys(cfg, **over):
  """Sets the dotted keys of ``over`` (``**{"rl.beta": 0.0}``) on ``cfg``; returns it."""
  for k, v in over.items():
    node = cfg
    *path, last = k.split(".")
    for part in path:
      node = node[part]
    node[last] = v
  return cfg


# The toy DiMOO backbone of the 8B-path tests (tests/models/test_t2i_task.py, test_no_torch.py).
TINY_LLADA = dict(d_model=32, n_layers=1, n_heads=2, mlp_hidden=64, dtype="float32")
# (caption, GenEval tag) rows of the toy t2i prompt files.
T2I_PROMPTS = [
    ("a red circle", "single_object"),
    ("two blue square", "counting"),
    ("a green triangle left of a red square", "position"),
    ("a blue circle", "colors"),
]


def toy_dimoo_config(*, workdir, prompts, url, tokenizer, checkpoint, vq):
  """``configs/lumina_dimoo_geneval.py`` at toy size: 2 x 2 codes of 32 px, the TINY_LLADA
  backbone at ``checkpoint``, the tiny VQ-GAN at ``vq``, ``prompts`` (JSONL) for training and eval,
  the reward server at ``url``; 2 RL steps of 4 prompts x G = 2."""
  c = tasks.load_config_file(os.path.join(REPO, "configs", "lumina_dimoo_geneval.py"))
  c.workdir = workdir
  c.world.train_prompts, c.world.eval_prompts = prompts
  c.world.reward_url, c.world.score_url = url + "/reward", url + "/strict"
  c.model.tokenizer = tokenizer
  c.model.image_size = 32  # 2 x 2 codes, a newline after each row
  c.model.overrides = dict(TINY_LLADA)
  c.model.checkpoint = checkpoint
  c.model.vq_checkpoint = vq
  c.model.vq_preset = "tiny"
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.sampler.num_steps, c.sampler.cfg_scale = 4, 2.0
  c.rl.group_size = 2
  c.rl.n_global, c.rl.n_struct, c.rl.n_refine = 1, 1, 1
  c.rl.micro_batch_size = None
  c.prompts_per_step, c.total_steps = 4, 2
  c.eval_every = c.save_every = 2
  c.eval.num_prompts, c.eval.batch_size, c.eval.grid_size = 4, 8, 4
  c.progress = False
  return c
