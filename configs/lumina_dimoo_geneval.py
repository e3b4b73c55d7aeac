"""HT-GRPO for Lumina-DiMOO (8B) on GenEval prompts (TPU pod slice).

  python launch/convert_checkpoint.py --preset=lumina_dimoo_8b --hf_dir=/ckpt/Lumina-DiMOO \
      --out_dir=/ckpt/dimoo_orbax
  python launch/train.py --config=configs/lumina_dimoo_geneval.py \
      --config.world.reward_url=http://reward-host:8000/score

As ``configs/mmada_geneval.py`` with DiMOO's layout (system prompt, rows ending in a newline
token, ``<uncondition>`` CFG branch), its aMUSEd VQ-GAN decoder and its sampler (64 steps, CFG 4,
constant temperature). 512x512 keeps rollouts affordable; any multiple of 16 works.
"""

import os

import ml_collections

from htgrpo_jax.config_util import load_config_file  # config files load by path, not as a package


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = load_config_file(os.path.join(os.path.dirname(__file__), "mmada_geneval.py"), arg)
  c.workdir = "runs/lumina_dimoo_geneval"
  c.model.preset = "lumina_dimoo_8b"
  c.model.layout = "dimoo"
  c.model.image_size = 512  # 32 rows x 32 codes (+ a newline per row)
  c.model.tokenizer = "/ckpt/Lumina-DiMOO"
  c.model.checkpoint = "/ckpt/dimoo_orbax"
  c.model.vq_kind = "vqgan"
  c.model.vq_checkpoint = "/ckpt/Lumina-DiMOO/vqvae"
  c.sampler.num_steps = 64
  c.sampler.rule = "maskgit"
  c.sampler.cfg_scale = 4.0
  c.sampler.temperature = 1.0
  c.sampler.temperature_mode = "constant"
  return c
