"""HT-GRPO for MMaDA-8B with LoRA (MaskGRPO's setting): rank 128, alpha 64, dropout 0.05 on the
attention q/k/v and the MLP up projections; the base is frozen, stored once, and with the adapters
off it is the KL reference (no second copy of the weights).

  python launch/train.py --config=configs/mmada_geneval_lora.py \
      --config.world.reward_url=http://reward-host:8000/score
  python launch/export.py --config=configs/mmada_geneval_lora.py --out_dir=/ckpt/mmada_htgrpo_merged

Everything else is ``configs/mmada_geneval.py``. The run's checkpoints hold the adapters and their
AdamW moments only; ``launch/export.py`` merges them into the base and writes Hugging Face
safetensors in MMaDA's own key layout. The learning rate is 10x the full fine-tuning one, the usual
LoRA ratio; it is not tuned here.
"""

import os

import ml_collections

from htgrpo_jax.config_util import load_config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = load_config_file(os.path.join(os.path.dirname(__file__), "mmada_geneval.py"), arg)
  c.workdir = "runs/mmada_geneval_lora"
  c.model.lora.update(rank=128, alpha=64.0, dropout=0.05, targets="q_proj|k_proj|v_proj|up_proj")
  c.optim.learning_rate = 1e-5
  return c
