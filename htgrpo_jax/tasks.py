"""Tasks: everything the trainer needs from a world, behind one small interface.

A ``Task`` bundles the policy's config and layout, the base params, a grain dataset of training
prompts, the held-out evaluation prompts, the VQ decoder (codes -> pixels, on device) and the
rewards. ``build_task(config)`` picks it from ``config.world.kind``:

* ``shapes``  the embedded ShapeEval world: built under ``world.data_dir`` on first use, its base
  policy pretrained into ``model.checkpoint`` when missing (``model.pretrain_if_missing``).
* ``t2i``     a real dMLLM (MMaDA / Lumina-DiMOO): prompts from JSONL files, the model's tokenizer
  and converted Orbax checkpoint from local paths, its VQ decoder, and a remote reward server.

Each builder registers in ``WORLDS`` under its ``world.kind``; a new world is one more
``@WORLDS.register('name')`` builder ``(config, *, log) -> Task``.

Every path is checked here, before anything is compiled, and errors name the config key. Any
path may be a URL (``gs://bucket/...``; ``htgrpo_jax.paths``).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import grain
import ml_collections
import numpy as np

from htgrpo_jax import paths
from htgrpo_jax.config_util import load_config_file  # also re-exported: tasks.load_config_file
from htgrpo_jax.contracts import DecodeFn, EvalPrompt, Registry, RewardFn
from htgrpo_jax.models import layouts, llada, policy


@dataclasses.dataclass
class Task:
  """What the trainer consumes.

  Attributes:
    name: for logs.
    model_cfg: the policy's ``LLaDAConfig``.
    layout: the sequence layout (prompt encoding, image slots, CFG branch).
    load_base_params: ``abstract params -> params`` laid out on the abstract leaves' shardings.
    train_dataset: ``(batch_size, seed) -> grain.IterDataset`` of dicts with ``caption`` str[P],
      ``prompt_tokens`` int32[P, Lp] and ``meta`` str[P] (JSON).
    eval_prompts: the held-out prompts, balanced over tags.
    decode: a ``contracts.DecodeFn``, ``(decode_params, codes int32[B, N]) -> uint8[B, H, W, 3]``,
      jittable (runs on the accelerator); the params are an argument, not a closure, so a
      40-90M-parameter VQ decoder is not baked into the compiled program as constants.
    decode_params: the decoder's params pytree (the ShapeEval codebook, or VQ-GAN/MAGVIT-v2 weights).
    reward: the RL reward, a ``contracts.RewardFn``: ``(prompts, images, meta=[...]) -> float32[B]``.
    score: the evaluation scorer ``(prompts, images, meta) -> strict float32[B]`` (GenEval 0/1).
    judge: optional ``(prompts, images, meta) -> [dict]`` giving each image's ``strict`` verdict
      with its ``reason`` (and ``malformed`` components) for the per-sample evaluation records.
  """
  name: str
  model_cfg: llada.LLaDAConfig
  layout: layouts.Layout
  load_base_params: Callable[[Any], Any]
  train_dataset: Callable[[int, int], grain.IterDataset]
  eval_prompts: list[EvalPrompt]
  decode: DecodeFn
  decode_params: Any
  reward: RewardFn
  score: Callable[..., np.ndarray]
  judge: Callable[..., list[dict[str, Any]]] | None = None


# ``world.kind`` -> ``(config, *, log) -> Task``.
WORLDS: Registry[Callable[..., Task]] = Registry("world.kind")


# ------------------------------------------------------------------------------------------------
# ShapeEval
# ------------------------------------------------------------------------------------------------

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
  for k, v in (config.model.get("pretrain") or {}).items():
    if k not in p:
      raise ValueError(f"model.pretrain.{k}: not a setting of {config.model.pretrain_config}")
    if v is not None:
      p[k] = v
  return p


def base_params_path(config: ml_collections.ConfigDict) -> str:
  return paths.resolve(paths.join(config.model.checkpoint, "params"))


@WORLDS.register("shapes")
def build_shapes_task(config: ml_collections.ConfigDict, *, log: Callable[[str], None] = print
                      ) -> Task:
  from htgrpo_jax import pretrain
  from htgrpo_jax.data import dataset as world_data
  from htgrpo_jax.data import prompts as grammar
  from htgrpo_jax.data import vq
  from htgrpo_jax.rewards.shapes import ShapeEvalReward

  if config.world.reward_mode not in ("dense", "strict"):
    raise ValueError(f"world.reward_mode={config.world.reward_mode!r} must be 'dense' or 'strict'")
  pcfg = pretrain_config(config)
  world = pretrain.world_config(pcfg)
  ckpt = base_params_path(config)
  if not paths.isdir(ckpt):
    if not config.model.pretrain_if_missing:
      raise ValueError(f"model.checkpoint: no base policy at {ckpt} and model.pretrain_if_missing "
                       "is False; run launch/pretrain.py or set it True")
    log(f"No base policy at {ckpt}: pretraining it first ({pcfg.num_steps} steps, at most "
        f"{pcfg.max_minutes:g} min; python launch/pretrain.py does this alone).")
    from tqdm import tqdm
    bar = {}

    def progress(it):
      bar["t"] = tqdm(it, total=pcfg.num_steps, desc="pretrain base", dynamic_ncols=True)
      return bar["t"]

    out = pretrain.pretrain(pcfg, progress=progress,
                            log=lambda s, m: bar["t"].set_postfix(loss=f"{m['loss']:.3f}"))
    bar["t"].close()
    log(f"Base policy: {out['steps_done']} steps in {out['seconds']:.0f} s -> {out['checkpoint']}")
  assets = world_data.build_world(config.world.data_dir, world, seed=config.seed,
                                  num_codes=config.world.num_codes,
                                  num_train=config.world.num_train, num_eval=config.world.num_eval)
  model_cfg, layout = pretrain.build_policy(pcfg, assets)
  codebook = assets.codebook

  def train_dataset(batch_size: int, seed: int) -> grain.IterDataset:
    return world_data.make_dataset(assets, "train", batch_size, seed=seed,
                                   encode_prompts=layout.encode_prompts)

  eval_seed = config.eval.get("seed")  # one held-out list for every run, whatever its seed
  evals = grammar.balanced_prompts("eval", config.eval.num_prompts,
                                   seed=config.seed if eval_seed is None else eval_seed, cfg=world)
  strict = ShapeEvalReward(world, mode="strict")
  task = Task(
      name="shapes", model_cfg=model_cfg, layout=layout,
      load_base_params=lambda abstract: pretrain.load_params(ckpt, abstract),
      train_dataset=train_dataset,
      eval_prompts=[EvalPrompt(p.text, p.meta.tag, p.meta.to_json()) for p in evals],
      decode=vq.decode, decode_params=codebook,
      reward=ShapeEvalReward(world, mode=config.world.reward_mode),
      score=lambda prompts, images, meta: strict(prompts, images, meta=meta),
      judge=lambda prompts, images, meta: strict.details(prompts, images, meta))
  if config.world.get("reward_url"):  # the same verifier behind a reward server (the 8B path's shape)
    task.reward, remote_strict = remote_rewards(config)
    task.score = lambda prompts, images, meta: remote_strict(prompts, images, meta=meta)
    task.judge = None
  return task


# ------------------------------------------------------------------------------------------------
# Real dMLLMs (MMaDA / Lumina-DiMOO)
# ------------------------------------------------------------------------------------------------

def read_prompt_file(path: str, key: str) -> list[EvalPrompt]:
  """Prompts from JSONL, one object per line with ``prompt`` and optionally ``tag`` (GenEval's
  ``evaluation_metadata.jsonl`` format); the whole object is passed on as metadata."""
  if not path or not paths.isfile(path):
    raise ValueError(f"{key}: prompt file {path!r} does not exist")
  out = []
  # Bytes, decoded per line as UTF-8 (JSONL's encoding), not the locale's: a C/POSIX locale would
  # otherwise read every non-ASCII prompt as an error, and a bad byte is named by its line.
  with paths.open(path, "rb") as f:
    for i, raw in enumerate(f):
      try:
        line = raw.decode("utf-8-sig" if i == 0 else "utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{key}: {path} line {i + 1} is not valid UTF-8 (byte {raw[e.start]:#04x} "
                         f"at column {e.start + 1})") from None
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{key}: {path} line {i + 1} is not JSON ({e})") from None
      if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
        raise ValueError(f"{key}: {path} line {i + 1} needs a non-empty string 'prompt'")
      out.append(EvalPrompt(rec["prompt"], str(rec.get("tag", "all")), json.dumps(rec)))
  if not out:
    raise ValueError(f"{key}: {path} holds no prompts")
  return out


def build_layout(config: ml_collections.ConfigDict) -> layouts.Layout:
  """The model's layout from ``model.layout`` and the local tokenizer at ``model.tokenizer``."""
  tok = config.model.tokenizer
  if not tok or not paths.isdir(tok):
    raise ValueError(f"model.tokenizer: tokenizer directory {tok!r} does not exist")
  build = layouts.LAYOUTS.get(config.model.layout)
  return build(tok, config.model)


def remote_rewards(config: ml_collections.ConfigDict):
  """(RL reward, strict evaluation scorer) clients from ``world.reward_url`` / ``score_url`` and
  the ``world.reward_timeout`` / ``reward_retries`` / ``reward_backoff_s`` settings, checked by
  name."""
  from htgrpo_jax.rewards.remote import RemoteReward

  w = config.world
  if not w.reward_url:
    raise ValueError("world.reward_url: the t2i world needs a reward server URL")
  if w.get("reward_mode") and not w.score_url:
    raise ValueError("world.score_url: a ShapeEval world served remotely needs the server's strict "
                     "endpoint too (world.reward_url is its dense one)")
  timeout, retries = w.reward_timeout, w.get("reward_retries", 3)
  backoff = w.get("reward_backoff_s", 0.5)
  num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
  if not (num(timeout) and timeout > 0):
    raise ValueError(f"world.reward_timeout={timeout!r}: must be a number > 0 (seconds per attempt)")
  if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
    raise ValueError(f"world.reward_retries={retries!r}: must be an int >= 0")
  if not (num(backoff) and backoff >= 0):
    raise ValueError(f"world.reward_backoff_s={backoff!r}: must be a number >= 0")
  kw = dict(timeout=float(timeout), max_retries=retries, backoff=float(backoff),
            metadata_keys=("meta",))
  for key in ("reward_url", "score_url"):
    url = w.get(key)
    if url and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
      raise ValueError(f"world.{key}={url!r}: must start with http:// or https://")
  reward = RemoteReward(w.reward_url, name="remote", **kw)
  # Evaluation asks the server's strict (GenEval 0/1) endpoint, by default the same URL.
  strict = RemoteReward(w.get("score_url") or w.reward_url, name="remote_strict", **kw)
  return reward, strict


@WORLDS.register("t2i")
def build_t2i_task(config: ml_collections.ConfigDict, *, log: Callable[[str], None] = print) -> Task:
  from htgrpo_jax.models import convert

  # The reward settings are checked (the clients built) before any file is read; a missing URL is
  # reported after the files, whose paths a user fills in first.
  rewards = remote_rewards(config) if config.world.reward_url else None
  train = read_prompt_file(config.world.train_prompts, "world.train_prompts")
  evals = read_prompt_file(config.world.eval_prompts, "world.eval_prompts")
  layout = build_layout(config)
  overrides = dict(config.model.get("overrides") or {})
  model_cfg = llada.get_config(config.model.preset, **overrides)
  policy.check_compatible(model_cfg, layout)
  ckpt = paths.resolve(config.model.checkpoint or "")
  if not config.model.checkpoint or not paths.isdir(ckpt):
    raise ValueError(f"model.checkpoint: converted Orbax checkpoint {ckpt!r} does not exist "
                     "(python launch/convert_checkpoint.py writes it)")
  from htgrpo_jax.models.vq import build_decoder
  decode, decode_params = build_decoder(config.model.vq_kind, config.model.vq_checkpoint,
                                        layout.grid, key="model.vq_checkpoint",
                                        preset=config.model.get("vq_preset") or None)
  if rewards is None:
    raise ValueError("world.reward_url: the t2i world needs a reward server URL")
  reward, strict = rewards
  encoded = layout.encode_prompts([p.text for p in train])  # fails here on a bad prompt

  def train_dataset(batch_size: int, seed: int) -> grain.IterDataset:
    records = [{"caption": p.text, "prompt_tokens": encoded[i], "meta": p.meta}
               for i, p in enumerate(train)]
    ds = grain.MapDataset.source(records).seed(seed).shuffle().repeat(None)
    return ds.batch(batch_size, drop_remainder=True).to_iter_dataset()

  return Task(
      name=config.model.preset, model_cfg=model_cfg, layout=layout,
      load_base_params=lambda abstract: convert.restore_params(ckpt, abstract),
      train_dataset=train_dataset, eval_prompts=evals, decode=decode,
      decode_params=decode_params, reward=reward,
      score=lambda prompts, images, meta: strict(prompts, images, meta=meta))


def build_task(config: ml_collections.ConfigDict, *, log: Callable[[str], None] = print) -> Task:
  """The ``Task`` of ``config.world.kind`` (a name in ``WORLDS``)."""
  return WORLDS.get(config.world.kind)(config, log=log)
