"""Pretraining of the ShapeEval base policy (masked diffusion on caption -> 8x8 VQ tokens).

  python launch/pretrain.py --config=configs/pretrain_shapes.py
  python launch/pretrain.py --config=configs/pretrain_shapes.py --config.num_steps=100 \
      --config.workdir=/tmp/base --config.eval.num_prompts=48
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = "runs/shapes_base"  # Orbax params land in {workdir}/params; table + grid too

  c.world = ml_collections.ConfigDict()
  c.world.data_dir = "runs/shapeworld"  # codebook, tokenizer, TFDS records (built once)
  c.world.canvas = 32
  c.world.patch = 4
  c.world.snap = True
  c.world.num_codes = 128
  c.world.num_train = 10000  # records; batches reshuffle every epoch
  c.world.num_eval = 1000

  c.model = ml_collections.ConfigDict()
  c.model.preset = "shapes"  # d=128, 4 layers, 4 heads (docs/architecture.md, ShapeEval)
  c.model.prompt_length = 16
  c.model.overrides = ml_collections.ConfigDict()  # any LLaDAConfig field

  c.batch_size = 64
  # The schedule and the end are step counts: reproducible. Under the strict judge a 600-step base
  # scores ~0.01 held-out, 1500 steps 0.087, 2000 steps 0.102 (docs/findings.md, section 2).
  c.num_steps = 1500
  c.max_minutes = 60.0  # safety cap only (~12 min on a quiet 2-core CPU); <= 0 disables
  c.p_uncond = 0.1  # prompt dropout for classifier-free guidance
  c.compilation_cache_dir = ""  # JAX's persistent compilation cache ("": off; htgrpo_jax/runtime.py)
  c.log_level = "info"  # absl verbosity (debug/info/warning/error)

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 50
  c.optim.final_lr_fraction = 0.05
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.max_grad_norm = 1.0

  c.log_every = 10

  # Held-out evaluation after training (skipped when num_prompts == 0).
  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 192  # balanced over the six tags
  c.eval.group_size = 8  # samples per prompt for the mixed-outcome statistic
  c.eval.group_prompts = 48  # prompts sampled group_size times
  c.eval.num_steps = 12
  c.eval.rule = "emerge"  # as configs/geneval.py's rollouts
  c.eval.cfg_scale = 2.0  # as configs/geneval.py's rollouts
  c.eval.temperature = 1.0
  c.eval.batch_size = 64
  c.eval.grid_size = 32
  return c
