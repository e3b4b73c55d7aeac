"""HT-GRPO for MMaDA-8B on GenEval prompts (TPU pod slice; the paper's MMaDA setting).

  python launch/convert_checkpoint.py --preset=mmada_8b --hf_dir=/ckpt/MMaDA-8B-Base --out_dir=/ckpt/mmada_orbax
  python launch/train.py --config=configs/mmada_geneval.py \
      --config.world.reward_url=http://reward-host:8000/score

Everything is read from local paths (no hub downloads on the workers): the converted Orbax
backbone, the MMaDA tokenizer folder, the MAGVIT-v2 decoder safetensors, and GenEval-format JSONL
prompt files. Rewards come from a reward server (``htgrpo_jax.rewards.remote``: a GenEval
detector on a GPU box, or Flow-GRPO's with ``world.reward_protocol=flowgrpo``) or run on the
accelerator next to the policy (``configs/mmada_geneval_owl.py``: OWLv2 + CLIP, CLIPScore). On a
multi-host slice every worker runs the same command (``launch/tpu_vm.sh train``);
``jax.distributed.initialize()`` is called automatically.

Per-device memory of these settings is checked without a TPU by ``launch/aot_compile.py``.
"""

import os

import ml_collections

from htgrpo_jax.config_util import load_config_file  # config files load by path, not as a package


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  # Same RL / optim / eval keys as the default config.
  c = load_config_file(os.path.join(os.path.dirname(__file__), "geneval.py"), arg)
  c.workdir = "runs/mmada_geneval"  # multi-host: a folder every worker shares (e.g. gcsfuse)

  c.world = ml_collections.ConfigDict()
  c.world.kind = "t2i"
  c.world.train_prompts = "/data/geneval/train_prompts.jsonl"  # {"prompt": ..., "tag": ..., ...}
  c.world.eval_prompts = "/data/geneval/evaluation_metadata.jsonl"
  c.world.reward_url = ""  # a server's dense reward for RL ("": config.rewards alone)
  c.world.score_url = ""  # strict 0/1 scorer for evaluation ("" = reward_url)
  c.world.score_reward = ml_collections.ConfigDict()  # on-device scorer {kind, **options} (mmada_geneval_owl.py)
  c.world.reward_protocol = "json"  # 'json': launch/reward_server.py; 'flowgrpo': Flow-GRPO's GenEval server
  c.world.reward_timeout = 120.0
  c.world.reward_retries = 3  # retries of a failed reward call (connection, 5xx, 429)
  c.world.reward_backoff_s = 2.0  # first retry delay, doubled per retry

  c.model = ml_collections.ConfigDict()
  c.model.preset = "mmada_8b"
  c.model.layout = "mmada"  # 512x512 -> 1024 MAGVIT-v2 codes, sequence 1539
  c.model.image_size = 512
  c.model.tokenizer = "/ckpt/MMaDA-8B-Base"  # local folder with tokenizer.json
  c.model.checkpoint = "/ckpt/mmada_orbax"  # launch/convert_checkpoint.py output
  c.model.vq_kind = "magvit2"
  c.model.vq_checkpoint = "/ckpt/magvitv2"  # folder with the decoder safetensors
  c.model.vq_preset = ""  # "" = the released decoder's sizes ("tiny": tests)
  c.model.overrides = ml_collections.ConfigDict(dict(remat="full"))
  # LoRA: rank 0 = full fine-tuning (configs/mmada_geneval_lora.py: MaskGRPO's r 128 / alpha 64).
  c.model.lora = ml_collections.ConfigDict(
      dict(rank=0, alpha=64.0, dropout=0.0, targets="q_proj|k_proj|v_proj|up_proj")
  )

  # MMaDA's T2I sampler: MaskGIT, cosine, CFG 3.5, annealed temperature (docs/models.md, samplers).
  c.sampler.num_steps = 15
  c.sampler.rule = "maskgit"
  c.sampler.cfg_scale = 3.5
  c.sampler.temperature = 1.0
  c.sampler.temperature_mode = "mmada_annealed"
  # The paper's estimator: HT-GRPO's sketch stages on the prompt-only all-mask canvas (None: the
  # preset's). ShapeEval's default replays the trajectory instead; untested at this scale.
  c.rl.sketch_context = None

  c.rl.group_size = 8
  c.rl.micro_batch_size = 32  # rows per gradient micro-batch (memory, not maths):
  # 2 per chip on a v5p-128 (fsdp 16), a multiple of data*fsdp
  c.optim.learning_rate = 1e-6
  c.optim.warmup_steps = 5
  c.prompts_per_step = 16  # 128 images per step
  c.total_steps = 1000
  c.eval_every = 100
  c.save_every = 50
  c.keep_checkpoints = 3
  c.save_every_minutes = 30.0  # and at least every 30 min of wall time (spot/maintenance)
  c.max_consecutive_skips = 20  # stop after this many non-finite inner updates in a row (0: never)
  c.allow_config_change = False  # resume even if seed/optim/rl/... changed (recorded)
  c.eval.num_prompts = 553  # GenEval's evaluation set
  c.eval.batch_size = 64
  c.eval.at_start = False

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=4, num_devices=0))
  return c
