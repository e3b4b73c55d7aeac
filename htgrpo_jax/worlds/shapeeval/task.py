"""The ShapeEval world's ``Task`` (``world.kind='shapes'``), registered in ``tasks.WORLDS``.

The world is built under ``world.data_dir`` on first use (``dataset.build_world``), its base policy
pretrained into ``model.checkpoint`` when missing (``model.pretrain_if_missing``); the rewards are
the pixel verifier (``verifier.ShapeEvalReward``), in process or behind a reward server
(``world.reward_url``).

``tasks.build_task`` imports this module (lazily: it imports ``htgrpo_jax.tasks`` for the ``Task``
interface and the registry), which registers the builder.
"""

from __future__ import annotations

import math

from typing import Callable

import grain
import ml_collections

from htgrpo_jax import paths
from htgrpo_jax.config_util import load_config_file
from htgrpo_jax.contracts import EvalPrompt
from htgrpo_jax.models import lora
from htgrpo_jax.tasks import WORLDS, Task, remote_rewards


def pretrain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The pretraining config for the base policy of a ShapeEval training ``config``: the file at
  ``model.pretrain_config`` with the training config's world, model (preset and overrides), seed
  and checkpoint folder, and the non-None ``model.pretrain`` settings."""
  p = load_config_file(config.model.pretrain_config)
  p.workdir = config.model.checkpoint
  p.seed = config.seed
  for k in ("data_dir", "canvas", "patch", "snap", "num_codes", "num_train", "num_eval"):
    p.world[k] = config.world[k]
  p.model.preset = config.model.preset
  p.model.overrides = ml_collections.ConfigDict(dict(config.model.get("overrides") or {}))
  _apply_pretrain_settings(p, config.model.get("pretrain") or {}, "model.pretrain", config.model.pretrain_config)
  return p


def _apply_pretrain_settings(dst: ml_collections.ConfigDict, src, prefix: str, file: str) -> None:
  """Copies the non-None settings of ``src`` onto ``dst``, into nested groups (``optim``) too."""
  for k, v in src.items():
    if k not in dst:
      raise ValueError(f"{prefix}.{k}: not a setting of {file}")
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      _apply_pretrain_settings(dst[k], v, f"{prefix}.{k}", file)
    elif v is not None:
      dst[k] = v


def _check_base_recipe(config, pcfg, ckpt: str, log: Callable[[str], None]) -> None:
  """An existing base policy is reused only if it was pretrained the way ``config`` asks (the
  recorded ``pretrain.json``), so a changed ``model.pretrain.*``, model or world setting never
  silently trains from another base (the seed may differ: every RL seed may share one frozen base).
  A checkpoint without a record is used with a notice."""
  from htgrpo_jax import pretrain

  diff = pretrain.recipe_mismatch(pcfg)
  if diff is None:
    log(f"Base policy: {ckpt} (no {pretrain.RECIPE_FILE} beside it: how it was pretrained is not recorded).")
  elif diff:
    raise ValueError(
        f"model.checkpoint: the base policy at {ckpt} was pretrained with other settings than this config "
        f"asks for (model.pretrain.*, model.*, world.*; recorded -> asked): {'; '.join(diff)}. Point "
        f"model.checkpoint at another folder to pretrain a new base there, or delete {config.model.checkpoint}."
    )


def base_params_path(config: ml_collections.ConfigDict) -> str:
  return paths.resolve(paths.join(config.model.checkpoint, "params"))


@WORLDS.register("shapes")
def build_shapes_task(config: ml_collections.ConfigDict, *, log: Callable[[str], None] = print) -> Task:
  from htgrpo_jax import pretrain
  from htgrpo_jax.worlds.shapeeval import codebook as patch_vq
  from htgrpo_jax.worlds.shapeeval import dataset as world_data
  from htgrpo_jax.worlds.shapeeval import grammar
  from htgrpo_jax.worlds.shapeeval.verifier import ShapeEvalReward, VerifierConfig

  if config.world.reward_mode not in ("dense", "strict"):
    raise ValueError(f"world.reward_mode={config.world.reward_mode!r} must be 'dense' or 'strict'")
  junk_half_life = config.world.get("junk_half_life", VerifierConfig.junk_half_life)
  if not (isinstance(junk_half_life, (int, float)) and junk_half_life > 0 and math.isfinite(junk_half_life)):
    raise ValueError(f"world.junk_half_life={junk_half_life!r}: want a finite number of px > 0")
  if config.world.get("reward_url") and junk_half_life != VerifierConfig.junk_half_life:
    raise ValueError(
        f"world.junk_half_life={junk_half_life}: applies to the in-process verifier only; with "
        "world.reward_url the server's reward decides (launch/reward_server.py "
        f"--serve=dense=shapeeval,mode=dense,junk_half_life={junk_half_life})"
    )
  pcfg = pretrain_config(config)
  world = pretrain.world_config(pcfg)
  ckpt = base_params_path(config)
  if not paths.isdir(ckpt):
    if not config.model.pretrain_if_missing:
      raise ValueError(
          f"model.checkpoint: no base policy at {ckpt} and model.pretrain_if_missing "
          "is False; run launch/pretrain.py or set it True"
      )
    log(
        f"No base policy at {ckpt}: pretraining it first ({pcfg.num_steps} steps, at most "
        f"{pcfg.max_minutes:g} min; python launch/pretrain.py does this alone)."
    )
    from tqdm import tqdm

    bar = {}

    def progress(it):
      bar["t"] = tqdm(it, total=pcfg.num_steps, desc="pretrain base", dynamic_ncols=True)
      return bar["t"]

    out = pretrain.pretrain(pcfg, progress=progress, log=lambda s, m: bar["t"].set_postfix(loss=f"{m['loss']:.3f}"))
    bar["t"].close()
    log(
        f"Base policy: {out['steps_done']} steps in {out['seconds']:.0f} s -> {out['checkpoint']} "
        f"(held-out masked-token loss {out['heldout_loss']:.4f})"
    )
  else:
    _check_base_recipe(config, pcfg, ckpt, log)
  assets = world_data.build_world(
      config.world.data_dir,
      world,
      seed=config.seed,
      num_codes=config.world.num_codes,
      num_train=config.world.num_train,
      num_eval=config.world.num_eval,
  )
  model_cfg, layout = pretrain.build_policy(pcfg, assets)
  model_cfg = lora.attach(model_cfg, config.model)  # the RL run's adapters (the base has none)
  codebook = assets.codebook

  def train_dataset(batch_size: int, seed: int) -> grain.IterDataset:
    return world_data.make_dataset(assets, "train", batch_size, seed=seed, encode_prompts=layout.encode_prompts)

  eval_seed = config.eval.get("seed")  # one held-out list for every run, whatever its seed
  evals = grammar.balanced_prompts(
      "eval", config.eval.num_prompts, seed=config.seed if eval_seed is None else eval_seed, cfg=world
  )
  strict = ShapeEvalReward(world, mode="strict")
  task = Task(
      name="shapes",
      model_cfg=model_cfg,
      layout=layout,
      load_base_params=lambda abstract: pretrain.load_params(ckpt, abstract),
      train_dataset=train_dataset,
      eval_prompts=[EvalPrompt(p.text, p.meta.tag, p.meta.to_json()) for p in evals],
      decode=patch_vq.decode,
      decode_params=codebook,
      reward=ShapeEvalReward(
          world, mode=config.world.reward_mode, vcfg=VerifierConfig(junk_half_life=float(junk_half_life))
      ),
      score=lambda prompts, images, meta: strict(prompts, images, meta=meta),
      judge=lambda prompts, images, meta: strict.details(prompts, images, meta),
  )
  if config.world.get("reward_url"):  # the same verifier behind a reward server (the 8B path's shape)
    task.reward, remote_strict = remote_rewards(config)
    task.score = lambda prompts, images, meta: remote_strict(prompts, images, meta=meta)
    task.judge = None
  return task
