"""Tasks: everything the trainer needs from a world, behind one small interface.

A ``Task`` bundles the policy's config and layout, the base params, a grain dataset of training
prompts, the held-out evaluation prompts, the VQ decoder (codes -> pixels, on device) and the
rewards. ``build_task(config)`` picks it from ``config.world.kind``:

* ``shapes``  the embedded ShapeEval world (``htgrpo_jax/worlds/shapeeval/task.py``): built under
  ``world.data_dir`` on first use, its base policy pretrained into ``model.checkpoint`` when
  missing (``model.pretrain_if_missing``).
* ``t2i``     a real dMLLM (MMaDA / Lumina-DiMOO): prompts from JSONL files, the model's tokenizer
  and converted Orbax checkpoint from local paths, its VQ decoder, and rewards from a reward server
  (``world.reward_url``) or registered rewards run in the trainer (``config.rewards`` for RL,
  ``world.score_reward`` for evaluation).

Each builder registers in ``WORLDS`` under its ``world.kind``; a new world is one more
``@WORLDS.register('name')`` builder ``(config, *, log) -> Task``. A world with its own package
(``htgrpo_jax/worlds/<name>/``) registers from its ``task`` module, which imports this one;
``load_worlds`` (called by ``build_task``) imports those modules, so this module imports them only
inside a function and there is no import cycle at load time.

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
from htgrpo_jax.config_util import load_config_file  # noqa: F401  (re-exported: tasks.load_config_file)
from htgrpo_jax.contracts import DecodeFn, EvalPrompt, Registry, RewardFn
from htgrpo_jax.models import layouts, llada, lora, policy


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


# ``world.kind`` -> ``(config, *, log) -> Task``; ``load_worlds()`` holds the packaged worlds too.
WORLDS: Registry[Callable[..., Task]] = Registry("world.kind")


def load_worlds() -> Registry[Callable[..., Task]]:
  """``WORLDS`` with every world registered: imports the task modules of the world packages
  (``htgrpo_jax/worlds/``), whose import registers their builders."""
  from htgrpo_jax.worlds.shapeeval import task  # noqa: F401  (registers 'shapes')

  return WORLDS


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
        raise ValueError(
            f"{key}: {path} line {i + 1} is not valid UTF-8 (byte {raw[e.start]:#04x} " f"at column {e.start + 1})"
        ) from None
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
  name.

  ``world.reward_protocol`` (optional, default 'json'): 'json' is the project's server
  (``launch/reward_server.py``); 'flowgrpo' is Flow-GRPO's GenEval server (``rewards.flowgrpo``),
  asked for its dense ``scores`` for RL and GenEval's own 0/1 ``rewards`` for evaluation.
  """
  from htgrpo_jax.rewards.remote import RemoteReward

  w = config.world
  protocol = w.get("reward_protocol", "json") or "json"
  if protocol not in ("json", "flowgrpo"):
    raise ValueError(
        f"world.reward_protocol={protocol!r}: must be 'json' (launch/reward_server.py) or "
        "'flowgrpo' (Flow-GRPO's GenEval reward server)"
    )
  if not w.reward_url:
    raise ValueError("world.reward_url: the t2i world needs a reward server URL")
  if w.get("reward_mode") and not w.score_url:
    raise ValueError(
        "world.score_url: a ShapeEval world served remotely needs the server's strict "
        "endpoint too (world.reward_url is its dense one)"
    )
  timeout, retries = w.reward_timeout, w.get("reward_retries", 3)
  backoff = w.get("reward_backoff_s", 0.5)
  num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
  if not (num(timeout) and timeout > 0):
    raise ValueError(f"world.reward_timeout={timeout!r}: must be a number > 0 (seconds per attempt)")
  if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
    raise ValueError(f"world.reward_retries={retries!r}: must be an int >= 0")
  if not (num(backoff) and backoff >= 0):
    raise ValueError(f"world.reward_backoff_s={backoff!r}: must be a number >= 0")
  kw = dict(timeout=float(timeout), max_retries=retries, backoff=float(backoff), metadata_keys=("meta",))
  for key in ("reward_url", "score_url"):
    url = w.get(key)
    if url and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
      raise ValueError(f"world.{key}={url!r}: must start with http:// or https://")
  if protocol == "flowgrpo":
    from htgrpo_jax.rewards.flowgrpo import FlowGRPOGenEval

    kw.pop("metadata_keys")
    return (
        FlowGRPOGenEval(w.reward_url, name="remote", field="scores", **kw),
        FlowGRPOGenEval(
            w.get("score_url") or w.reward_url, name="remote_strict", field="rewards", only_strict=False, **kw
        ),
    )
  reward = RemoteReward(w.reward_url, name="remote", **kw)
  # Evaluation asks the server's strict (GenEval 0/1) endpoint, by default the same URL.
  strict = RemoteReward(w.get("score_url") or w.reward_url, name="remote_strict", **kw)
  return reward, strict


@WORLDS.register("t2i")
def build_t2i_task(config: ml_collections.ConfigDict, *, log: Callable[[str], None] = print) -> Task:
  from htgrpo_jax.models import convert

  # The reward settings are checked (the clients built) before any file is read; a missing reward
  # is reported after the files, whose paths a user fills in first. The on-device scorer
  # (``world.score_reward``) loads its checkpoints, so it is built last.
  w = config.world
  rewards = remote_rewards(config) if w.reward_url else None
  score_entry = score_reward_entry(config)
  train = read_prompt_file(w.train_prompts, "world.train_prompts")
  evals = read_prompt_file(w.eval_prompts, "world.eval_prompts")
  layout = build_layout(config)
  overrides = dict(config.model.get("overrides") or {})
  model_cfg = lora.attach(llada.get_config(config.model.preset, **overrides), config.model)
  policy.check_compatible(model_cfg, layout)
  ckpt = paths.resolve(config.model.checkpoint or "")
  if not config.model.checkpoint or not paths.isdir(ckpt):
    raise ValueError(
        f"model.checkpoint: converted Orbax checkpoint {ckpt!r} does not exist "
        "(python launch/convert_checkpoint.py writes it)"
    )
  from htgrpo_jax.models.vq import build_decoder

  decode, decode_params = build_decoder(
      config.model.vq_kind,
      config.model.vq_checkpoint,
      layout.grid,
      key="model.vq_checkpoint",
      preset=config.model.get("vq_preset") or None,
  )
  if rewards is None and not config.get("rewards"):
    raise ValueError(
        "world.reward_url: the t2i world needs a reward: a reward server URL, or "
        "config.rewards entries (docs/rewards.md)"
    )
  if rewards is None and score_entry is None:
    raise ValueError(
        "world.score_reward: with no world.reward_url, evaluation needs a strict scorer: "
        "world.score_reward = {kind, **options} (e.g. kind 'geneval_owl' with mode "
        "'strict', or kind 'remote' with the server's strict URL)"
    )
  reward, strict = rewards if rewards is not None else (None, None)
  judge = None
  if score_entry is not None:
    from htgrpo_jax.rewards.registry import build_reward

    kind, options = score_entry
    strict = build_reward(kind, options, "world.score_reward", name="score")
    if callable(getattr(strict, "judge", None)):  # GenEvalReward: each verdict with its reason
      judge = lambda prompts, images, meta: [
          dict(strict=v.strict, reason=v.reason) for v in strict.judge(prompts, images, meta)
      ]
  encoded = layout.encode_prompts([p.text for p in train])  # fails here on a bad prompt

  def train_dataset(batch_size: int, seed: int) -> grain.IterDataset:
    records = [{"caption": p.text, "prompt_tokens": encoded[i], "meta": p.meta} for i, p in enumerate(train)]
    ds = grain.MapDataset.source(records).seed(seed).shuffle().repeat(None)
    return ds.batch(batch_size, drop_remainder=True).to_iter_dataset()

  return Task(
      name=config.model.preset,
      model_cfg=model_cfg,
      layout=layout,
      load_base_params=lambda abstract: convert.restore_params(ckpt, abstract),
      train_dataset=train_dataset,
      eval_prompts=evals,
      decode=decode,
      decode_params=decode_params,
      reward=reward,
      score=lambda prompts, images, meta: strict(prompts, images, meta=meta),
      judge=judge,
  )


def score_reward_entry(config: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]] | None:
  """``(kind, options)`` of the t2i world's on-device evaluation scorer ``world.score_reward``
  (``{kind, **options}``, a registered reward; None when unset or empty), checked by name."""
  entry = config.world.get("score_reward")
  if not entry:
    return None
  if not hasattr(entry, "items"):
    raise ValueError(
        f"world.score_reward={entry!r}: must be a dict {{kind, **options}} of a registered " "reward (docs/rewards.md)"
    )
  if config.world.get("score_url"):
    raise ValueError("world.score_reward: set it or world.score_url (the server's strict scorer), not both")
  options = dict(entry.items())
  kind = options.pop("kind", None)
  if not isinstance(kind, str) or not kind:
    raise ValueError(
        f"world.score_reward.kind={kind!r}: must name a registered reward " "(python launch/reward_server.py --list)"
    )
  for key in ("weight", "group_norm"):
    if key in options:
      raise ValueError(
          f"world.score_reward.{key}: the evaluation scorer is one reward, not a weighted "
          "sum; set the reward's own options only"
      )
  return kind, options


def build_task(config: ml_collections.ConfigDict, *, log: Callable[[str], None] = print) -> Task:
  """The ``Task`` of ``config.world.kind`` (a name in ``WORLDS``, world packages loaded).

  A non-empty ``config.rewards`` replaces the RL reward by its weighted sum
  (``rewards.registry.weighted_from_config``; kind ``'world'`` is the world's own reward); the
  evaluation scorer stays the world's.
  """
  task = load_worlds().get(config.world.kind)(config, log=log)
  if config.get("rewards"):
    from htgrpo_jax.rewards.registry import weighted_from_config

    task.reward = weighted_from_config(config.rewards, world=task.reward, group_size=config.rl.group_size)
  return task
