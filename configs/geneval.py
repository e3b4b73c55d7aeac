"""HT-GRPO on the embedded ShapeEval world (the default; runs on a laptop CPU with no downloads).

  python launch/train.py --config=configs/geneval.py                 # HT-GRPO
  python launch/train.py --config=configs/geneval.py:maskgrpo        # a baseline in the same trainer
  python launch/train.py --config=configs/geneval.py:htgrpo,tiny     # a 1-minute smoke run
  python launch/train.py --config=configs/geneval.py:htgrpo,emerge   # the earlier default
  python launch/train.py --config=configs/geneval.py --config.total_steps=20 --config.workdir=/tmp/run

The argument after ':' is ``preset[,tiny][,emerge]``: the RL preset (htgrpo (default), maskgrpo,
tracegrpo, uni), optionally ``tiny`` (a small model, world and run for tests, Colab and smoke checks)
and ``emerge`` (the settings every study before docs/findings.md section 12 ran: MaskGRPO's emerge
sampler at CFG 2 for rollouts and evaluation, and HT-GRPO's sketch stages on the paper's all-mask
canvas).
Any ``HTGRPOConfig`` field can be overridden under ``rl``, e.g. ``--config.rl.beta=0.0``
(the fields are read from the dataclass, typed, so the flag parser knows each one's type).
Switch presets with the argument, not ``--config.rl.preset``: the default sets
``rl.sketch_context='trajectory'``, which only the htgrpo estimator has (another preset or
estimator on the command line needs ``--config.rl.sketch_context=all_mask`` too, and says so).
"""

import dataclasses
import importlib.util
import os
import sys

import ml_collections
from ml_collections import config_dict

RL_PRESETS = ("htgrpo", "maskgrpo", "tracegrpo", "uni")
# Set by the trainer (rl.group_size is its own key; T is sampler.num_steps; K is derived).
_RL_DERIVED = ("group_size", "num_sampler_steps", "num_iterations")


def rl_fields() -> dict[str, type]:
  """Every overridable ``HTGRPOConfig`` field and its type, read from the dataclass itself (so a new
  field is settable as ``--config.rl.<field>=...`` with no list to update). The module is loaded by
  path: parsing a config must not import JAX."""
  spec = importlib.util.find_spec("htgrpo_jax")
  path = os.path.join(spec.submodule_search_locations[0], "rl", "config.py")
  mod_spec = importlib.util.spec_from_file_location("_htgrpo_rl_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  sys.modules[mod_spec.name] = mod  # dataclasses looks its module up while building the class
  mod_spec.loader.exec_module(mod)
  types = {"int": int, "float": float, "str": str, "bool": bool}
  out = {}
  for f in dataclasses.fields(mod.HTGRPOConfig):
    if f.name not in _RL_DERIVED:
      out[f.name] = types[str(f.type).replace(" | None", "").strip()]
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = [a for a in (arg or "htgrpo").split(",") if a]
  preset = parts[0] if parts and parts[0] != "tiny" else "htgrpo"
  tiny, emerge = "tiny" in parts, "emerge" in parts
  unknown = [a for a in parts if a not in RL_PRESETS + ("tiny", "emerge")]
  if unknown:
    raise ValueError(
        f"configs/geneval.py: unknown argument(s) {unknown}; use '<preset>[,tiny][,emerge]' with a preset "
        f"from {RL_PRESETS}"
    )
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = f"runs/geneval_{preset}" + ("_tiny" if tiny else "")

  # The world: what the prompts, tokens, pixels and rewards are.
  c.world = ml_collections.ConfigDict()
  c.world.kind = "shapes"
  c.world.data_dir = "runs/shapeworld"  # world assets (codebook, tokenizer, prompt records), built once
  c.world.reward_mode = "dense"  # RL reward: dense partial score; eval is always strict 0/1
  c.world.junk_half_life = 32.0  # dense reward: malformed px that halve it (the strict judge ignores it)
  c.world.reward_url = ""  # "": the verifier in-process; else a reward server's
  c.world.score_url = ""  #   /dense and /strict (python launch/reward_server.py)
  c.world.reward_timeout = 30.0
  c.world.reward_retries = 3
  c.world.reward_backoff_s = 0.5
  c.world.canvas = 32  # px per side; 8x8 tokens of 4x4 px
  c.world.patch = 4
  c.world.snap = True  # objects on the patch grid (False: the harder variant)
  c.world.num_codes = 128
  c.world.num_train = 10000
  c.world.num_eval = 1000

  # The RL reward: {} is the world's own (above). Otherwise a weighted sum of named rewards, each
  # {kind, weight, group_norm, **options} (kind 'world' = the world's reward; docs/rewards.md), e.g.
  # c.rewards.geneval = dict(kind="flowgrpo_geneval", url="http://gpu:18085", weight=1.0, group_norm=True)
  c.rewards = ml_collections.ConfigDict()
  # Rollouts are sampled in `chunks` parts of prompts_per_step / chunks prompts; while one part
  # samples, the previous one is scored on the host (at most `max_in_flight` parts at once; 0:
  # score each part after it is sampled, no overlap). chunks=1: one part, nothing overlaps.
  c.rollout = ml_collections.ConfigDict(dict(chunks=1, max_in_flight=2))

  # The policy.
  c.model = ml_collections.ConfigDict()
  c.model.preset = "shapes"
  c.model.checkpoint = "runs/shapes_base"  # base policy (Orbax params under {checkpoint}/params)
  c.model.pretrain_if_missing = True  # pretrain it first (launch/pretrain.py's job) when missing
  c.model.pretrain_config = "configs/pretrain_shapes.py"
  # Pretraining settings (None keeps configs/pretrain_shapes.py's value). Typed placeholders, so
  # that --config.model.pretrain.num_steps=2000 works on the command line.
  unset = ml_collections.config_dict.placeholder
  c.model.pretrain = ml_collections.ConfigDict(
      dict(
          num_steps=unset(int),
          max_minutes=unset(float),
          batch_size=unset(int),
          optim=dict(learning_rate=unset(float)),
      )
  )
  # LoRA (htgrpo_jax/models/lora.py): rank 0 = off (full fine-tuning). On, the state trains the
  # adapters only, the base is frozen and the KL reference is the base with the adapters off.
  c.model.lora = ml_collections.ConfigDict(
      dict(rank=0, alpha=32.0, dropout=0.0, targets="q_proj|k_proj|v_proj|up_proj")
  )

  # Rollouts.
  c.sampler = ml_collections.ConfigDict()
  c.sampler.num_steps = 12
  # 0: ceil(rl.sketch_fraction * num_steps), the algorithm's sketch phase (any other value must equal it).
  c.sampler.sketch_steps = 0
  # Confidence-ordered unmasking (MMaDA's and Lumina-DiMOO's own samplers) at CFG 1 for rollouts and
  # evaluation. The default base scores 0.210 with it, against 0.087 with MaskGRPO's random-order
  # emerge sampler at CFG 2 (the earlier default), and RL gains more from it (docs/findings.md, 11-12).
  c.sampler.rule = "emerge" if emerge else "maskgit"
  c.sampler.schedule = "cosine"
  c.sampler.cfg_scale = 2.0 if emerge else 1.0  # maskgit: 0.129 at 0, 0.210 at 1, 0.184 at 2 (192 x 4)
  c.sampler.temperature = 1.0
  c.sampler.temperature_mode = "constant"
  # maskgit: no two slots committed in one step within this grid distance while a farther one is left
  # (0: off; docs/findings.md, section 19).
  c.sampler.spread = 0
  # True: rl.num_sketches (>= 2) sketches per prompt, each branched into G / M paints.
  c.sampler.share_sketch = False

  # The algorithm: htgrpo_jax.rl.preset(rl.preset) with every field set below overriding it. Unset
  # fields are typed placeholders (None until given), so --config.rl.beta=0 parses as a float.
  c.rl = ml_collections.ConfigDict()
  c.rl.preset = preset
  c.rl.group_size = 8
  for field, kind in rl_fields().items():
    c.rl[field] = config_dict.placeholder(kind)
  if preset == "htgrpo" and not emerge:
    # HT-GRPO's global and struct iterations score the sketch tokens on the canvases the sampler
    # saw (TraceGRPO's context under HT-GRPO's stages, partition and credit), not on the paper's
    # prompt-only all-mask canvas: ahead of it in five of six ShapeEval studies, level in one (pooled,
    # +0.039 [0.017, 0.061]; +0.071 [0.013, 0.127] with this sampler; docs/findings.md, section 12).
    c.rl.sketch_context = "trajectory"

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 2  # RL steps (each K inner updates)
  c.optim.decay = "constant"  # after warm-up; or "cosine" down to final_lr_fraction x at total_steps
  c.optim.final_lr_fraction = 0.0
  c.optim.max_grad_norm = 1.0
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99

  c.prompts_per_step = 8  # x group_size images per step
  c.total_steps = 60
  # ('data', 'fsdp', 'tensor') sizes, one may be -1; num_devices > 0 uses only the first ones.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=0))

  c.log_every = 1
  c.eval_every = 20
  c.save_every = 10
  c.keep_checkpoints = 2
  c.save_every_minutes = 0.0  # also save after this much wall time since the last save (0: off)
  # Stop (NonFiniteUpdateError) after this many non-finite inner updates in a row (0: never).
  c.max_consecutive_skips = 20
  c.allow_config_change = False  # resume even if seed/optim/rl/... changed (config_history.jsonl)
  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 192  # held-out prompts, balanced over the six tags
  c.eval.samples_per_prompt = 1  # images per prompt at the periodic evaluations
  c.eval.final_samples_per_prompt = 4  # ... at the base and final ones (GenEval uses 4)
  c.eval.seed = 0  # one eval key for every run: arms and seeds are paired
  c.eval.batch_size = 64
  c.eval.grid_size = 32
  c.eval.at_start = True  # score the base policy first (the table's baseline column)
  # Evaluation-only rollout cache (DiMOO's ML-Cache; docs/performance.md "Rollout cache"). Training rollouts
  # refuse it (sampler.cache): the importance ratios score the policy without it.
  c.eval.sampler_cache = ml_collections.ConfigDict()
  c.eval.sampler_cache.enabled = False
  c.eval.sampler_cache.ratio = 0.9  # fraction of positions served from the cache on a cached step
  c.eval.sampler_cache.warmup_ratio = 0.3  # steps [0, int(T * warmup_ratio)] run in full
  c.eval.sampler_cache.refresh_interval = 5  # then a full refresh every this many steps
  c.progress = True
  # Process setup (htgrpo_jax/runtime.py) and tracing.
  c.compilation_cache_dir = ""  # JAX's persistent compilation cache ("": off); relaunches skip compiles
  c.log_level = "info"  # absl verbosity of process 0 (debug/info/warning/error); others: warning
  c.profile_steps = ""  # "start,stop": jax.profiler trace of RL steps [start, stop)

  if tiny:
    c.world.data_dir = "runs/shapeworld_tiny"
    c.world.num_train, c.world.num_eval = 512, 64
    c.model.checkpoint = "runs/shapes_base_tiny"
    c.model.overrides = ml_collections.ConfigDict(dict(d_model=32, n_layers=1, n_heads=2, mlp_hidden=64))
    c.model.pretrain.num_steps, c.model.pretrain.batch_size = 30, 16
    c.sampler.num_steps = 4
    c.rl.group_size = 4
    c.rl.n_global, c.rl.n_struct, c.rl.n_refine = 1, 1, 1
    c.prompts_per_step = 4
    c.total_steps = 4
    c.eval_every = 2
    c.save_every = 2
    c.eval.num_prompts = 16
    c.eval.final_samples_per_prompt = 2
    c.eval.batch_size = 16
    c.eval.grid_size = 8
  return c
