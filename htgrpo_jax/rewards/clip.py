"""CLIP rewards on the accelerator: CLIPScore, and GenEval's colour classifier.

``CLIPScore`` (Hessel et al., 2021): ``w * max(cos(image, prompt), 0)`` with w = 2.5, image
preprocessed as CLIP's eval transform (``models.clip_image``), prompt tokenized by the model's
tokenizer (truncated at its context length). A reward: ``(prompts, images, **columns) -> float32[B]``.

``ColorClassifier`` is GenEval's ``color_classification`` (``evaluation/evaluate_images.py``):
for each detected object, the image is composited on #999999 outside the object's mask, cropped
to its box and preprocessed; the crop is classified zero-shot among ``geneval.COLORS`` with the
class-specific templates

    "a photo of a {color} {object}", "a photo of a {color}-colored {object}", "a photo of a {color} object"

(clip_benchmark's ``zero_shot_classifier``: each template's text embedding normalised, averaged
over templates, renormalised) and logits ``100 * cos`` (``run_classification``); the colour is
the argmax. GenEval runs open_clip ViT-L-14 with the OpenAI weights (``clip.PRESETS['vit_l14']``,
QuickGELU). Crops of every object of a batch are one jitted program whatever their boxes.

Both take a ``CLIPBundle`` (config, params, tokenizer): ``load_clip`` reads an HF ``CLIPModel``
dir or an open_clip safetensors file and a local tokenizer dir.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from htgrpo_jax import paths
from htgrpo_jax.models import clip, clip_image
from htgrpo_jax.rewards.base import check_images
from htgrpo_jax.rewards.geneval import COLORS
from htgrpo_jax.rewards.registry import REWARDS

GENEVAL_COLOR_TEMPLATES = (
    "a photo of a {color} {object}",
    "a photo of a {color}-colored {object}",
    "a photo of a {color} object",
)
GENEVAL_BACKGROUND = (153, 153, 153)  # GenEval's bgcolor "#999"
GENEVAL_LOGIT_SCALE = 100.0  # clip_benchmark's run_classification
LAYOUTS = ("hf", "open_clip")


@dataclasses.dataclass(frozen=True)
class CLIPBundle:
  """A CLIP model ready to run: ``config`` (``clip.CLIPConfig``), ``params``, ``tokenizer``."""

  config: clip.CLIPConfig
  params: Any
  tokenizer: Any


def load_clip(
    checkpoint: str,
    tokenizer: str | None = None,
    *,
    layout: str = "hf",
    config: clip.CLIPConfig | str | None = None,
    mesh=None,
) -> CLIPBundle:
  """Loads CLIP weights and a local tokenizer.

  Args:
    checkpoint: ``layout='hf'``: an HF ``CLIPModel`` dir (``config.json`` + ``model.safetensors``);
      ``'open_clip'``: a safetensors file of an open_clip ``CLIP`` state dict (or a dir holding
      ``open_clip_model.safetensors``).
    tokenizer: a local tokenizer dir (default: ``checkpoint`` for 'hf'; required for 'open_clip').
    layout: 'hf' or 'open_clip'.
    config: a ``clip.CLIPConfig`` or a ``clip.PRESETS`` name; 'hf' reads ``config.json`` when None,
      'open_clip' requires it.
    mesh: replicate the params over it.

  Raises:
    ValueError naming the argument or tensor at fault.
  """
  from htgrpo_jax.models import clip_convert

  if layout not in LAYOUTS:
    raise ValueError(f"load_clip: layout={layout!r}; expected one of {LAYOUTS}")
  if isinstance(config, str):
    if config not in clip.PRESETS:
      raise ValueError(f"load_clip: config={config!r} is not a preset ({tuple(clip.PRESETS)})")
    config = clip.PRESETS[config]
  if layout == "hf":
    config, params = clip_convert.load_hf_clip(checkpoint, config, mesh=mesh)
    tokenizer = tokenizer or checkpoint
  else:
    if config is None or tokenizer is None:
      raise ValueError("load_clip(layout='open_clip') needs config= (a preset or CLIPConfig) and tokenizer=")
    params = clip_convert.load_open_clip(checkpoint, config, mesh=mesh)
  return CLIPBundle(config, params, clip.load_tokenizer(tokenizer))


def _size(config: clip.CLIPConfig) -> int:
  return config.vision.image_size


def on_mesh(mesh, *arrays: np.ndarray) -> tuple[Any, ...]:
  """Host batches -> device arrays: as they are without ``mesh``; with it, the leading dim padded
  (repeating the last row) to a multiple of data*fsdp and split over ``('data', 'fsdp')``, so the
  jitted reward programs run data-parallel on the policy's mesh (slice outputs back to the batch).
  Every process must call with the same batch (``parallel.global_batch``)."""
  if mesh is None:
    return tuple(jnp.asarray(a) for a in arrays)
  from htgrpo_jax import parallel

  mesh = parallel.auto_mesh(mesh)
  div = parallel.batch_size_divisor(mesh)
  out = []
  for a in arrays:
    a = np.asarray(a)
    pad = (-a.shape[0]) % div
    if pad:
      a = np.concatenate([a, np.repeat(a[-1:], pad, axis=0)])
    out.append(parallel.global_batch(a, mesh))
  return tuple(out)


def to_numpy(x: jax.Array, n: int) -> np.ndarray:
  """The first ``n`` rows of a (possibly sharded) device array, as numpy."""
  from htgrpo_jax import parallel

  return np.asarray(parallel.to_host(x) if isinstance(x, jax.Array) else x)[:n]


def token_ids(bundle: CLIPBundle, texts: Sequence[str], who: str) -> np.ndarray:
  """``int32[N, max_length]`` ids of ``texts``; raises ValueError naming ``who`` when the tokenizer
  yields ids the model's embedding does not have (a tokenizer of another model: the lookup would
  silently read NaN)."""
  ids = clip.tokenize(bundle.tokenizer, texts, bundle.config.text.max_length)
  if ids.size and (ids.min() < 0 or ids.max() >= bundle.config.text.vocab_size):
    raise ValueError(
        f"{who}: the tokenizer gives id {int(ids.max())} but the model's vocab_size is "
        f"{bundle.config.text.vocab_size} (tokenizer and checkpoint do not match)"
    )
  return ids


@functools.partial(jax.jit, static_argnames=("config",))
def clip_score(params: Any, images: jax.Array, ids: jax.Array, config: clip.CLIPConfig) -> jax.Array:
  """``float32[B]`` cosine similarity of ``images uint8[B, H, W, 3]`` and token ``ids int32[B, L]``."""
  pixels = clip_image.preprocess(images, _size(config))
  img = clip.image_features(params, pixels, config)
  txt = clip.text_features(params, ids, config)
  return jnp.sum(img * txt, axis=-1)


class CLIPScore:
  """CLIPScore reward ``(prompts, images, **columns) -> float32[B]`` = ``weight * max(cos, 0)``.

  Args:
    bundle: a ``CLIPBundle``.
    weight: Hessel et al.'s w (2.5); 1.0 gives the clipped cosine.
    prefix: prepended to every prompt (Hessel et al. use "A photo depicts "; default none).
    mesh: run data-parallel over this mesh (``on_mesh``; load the params with ``mesh=`` too).
  """

  name = "clipscore"

  def __init__(self, bundle: CLIPBundle, *, weight: float = 2.5, prefix: str = "", mesh=None):
    if not np.isfinite(weight) or weight <= 0:
      raise ValueError(f"CLIPScore: weight={weight!r} must be a positive number")
    self.bundle, self.weight, self.prefix, self.mesh = bundle, float(weight), prefix, mesh

  def cosine(self, prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
    """``float32[B]`` raw cosine similarities."""
    images = check_images(self.name, prompts, images)
    b = self.bundle
    ids = token_ids(b, [self.prefix + p for p in prompts], f"reward {self.name!r}")
    x, t = on_mesh(self.mesh, images, ids)
    return to_numpy(clip_score(b.params, x, t, b.config), len(prompts)).astype(np.float32)

  def __call__(self, prompts: Sequence[str], images: np.ndarray, **columns: Any) -> np.ndarray:
    return (self.weight * np.maximum(self.cosine(prompts, images), 0.0)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("config", "background"))
def color_logits(
    params: Any,
    images: jax.Array,
    boxes: jax.Array,
    masks: jax.Array | None,
    weights: jax.Array,
    config: clip.CLIPConfig,
    background: tuple[int, int, int] = GENEVAL_BACKGROUND,
) -> jax.Array:
  """GenEval's colour logits of every object.

  Args:
    images: ``uint8[B, H, W, 3]``.
    boxes: ``float[B, K, 4]`` (x0, y0, x1, y1) pixels.
    masks: ``bool[B, K, H, W]`` or None (whole boxes).
    weights: ``float32[B, K, C, P]`` each object's classifier (``ColorClassifier.class_weights``
      of its class).

  Returns:
    ``float32[B, K, C]`` = 100 * cos(crop, colour class embedding).
  """
  b, k = boxes.shape[:2]
  s = _size(config)
  crops = clip_image.preprocess_boxes(images, boxes, masks, background, s).reshape(b * k, s, s, 3)
  feats = clip.image_features(params, crops, config).reshape(b, k, -1)
  return GENEVAL_LOGIT_SCALE * jnp.einsum("bkp,bkcp->bkc", feats, weights.astype(jnp.float32))


_text_features = jax.jit(clip.text_features, static_argnames="config")


class ColorClassifier:
  """GenEval's CLIP colour classifier (see the module docstring).

  ``logits(images, boxes, classes, masks)`` classifies a batch of objects at once;
  ``__call__(image, classname, boxes, masks)`` is GenEval's ``color_classification`` for one image
  and one class (a list of colour names).
  """

  def __init__(
      self,
      bundle: CLIPBundle,
      *,
      colors: Sequence[str] = COLORS,
      templates: Sequence[str] = GENEVAL_COLOR_TEMPLATES,
      background: tuple[int, int, int] = GENEVAL_BACKGROUND,
      mesh=None,
  ):
    for t in templates:
      if "{color}" not in t:
        raise ValueError(f"ColorClassifier: template {t!r} has no {{color}} field")
    self.bundle, self.colors, self.templates = bundle, tuple(colors), tuple(templates)
    self.background = tuple(int(v) for v in background)
    self._weights: dict[str, np.ndarray] = {}
    self.mesh = mesh

  def class_weights(self, classname: str) -> np.ndarray:
    """``float32[len(colors), P]``: per colour, the normalised mean of the normalised template
    embeddings (clip_benchmark's ``zero_shot_classifier``); cached per class name."""
    if classname not in self._weights:
      b = self.bundle
      texts = [t.format(color=c, object=classname) for c in self.colors for t in self.templates]
      ids = token_ids(b, texts, "ColorClassifier")
      emb = _text_features(b.params, jnp.asarray(ids), b.config)
      emb = np.asarray(emb, np.float32).reshape(len(self.colors), len(self.templates), -1).mean(axis=1)
      self._weights[classname] = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    return self._weights[classname]

  def logits(
      self, images: np.ndarray, boxes: np.ndarray, classes: Sequence[Sequence[str]], masks: np.ndarray | None = None
  ) -> np.ndarray:
    """``float32[B, K, C]`` logits for ``boxes float[B, K, 4]`` of class ``classes[b][k]``.

    Raises:
      ValueError naming the argument whose shape does not fit ``images uint8[B, H, W, 3]``.
    """
    images = np.asarray(images)
    boxes = np.asarray(boxes, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"ColorClassifier: images must be uint8[B, H, W, 3], got {images.dtype}{list(images.shape)}")
    b, h, w = images.shape[:3]
    if boxes.ndim != 3 or boxes.shape[0] != b or boxes.shape[2] != 4:
      raise ValueError(f"ColorClassifier: boxes must be float[{b}, K, 4], got {list(boxes.shape)}")
    k = boxes.shape[1]
    if len(classes) != b or any(len(c) != k for c in classes):
      raise ValueError(f"ColorClassifier: classes must be {b} lists of {k} class names")
    if masks is not None:
      masks = np.asarray(masks, bool)
      if masks.shape != (b, k, h, w):
        raise ValueError(f"ColorClassifier: masks must be bool[{b}, {k}, {h}, {w}], got {list(masks.shape)}")
    weights = (
        np.stack([np.stack([self.class_weights(c) for c in row]) for row in classes])
        if k
        else np.zeros((b, 0, len(self.colors), self.bundle.config.projection_dim), np.float32)
    )
    if masks is None:
      x, bx, wt = on_mesh(self.mesh, images, boxes, weights)
      m = None
    else:
      x, bx, wt, m = on_mesh(self.mesh, images, boxes, weights, masks)
    out = color_logits(self.bundle.params, x, bx, m, wt, self.bundle.config, self.background)
    return to_numpy(out, b).astype(np.float32)

  def __call__(
      self, image: np.ndarray, classname: str, boxes: np.ndarray, masks: np.ndarray | None = None
  ) -> list[str]:
    """GenEval's ``color_classification(image, bboxes, classname)``: the colour of each box."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if not len(boxes):
      return []
    logits = self.logits(
        np.asarray(image)[None],
        boxes[None],
        [[classname] * len(boxes)],
        None if masks is None else np.asarray(masks)[None],
    )[0]
    return [self.colors[i] for i in logits.argmax(-1)]


def local_mesh(data_parallel: bool):
  """A mesh whose ``data`` axis is this process's devices (None when not ``data_parallel``).

  A trainer scores on process 0 alone (``rollouts.host_once``) and a reward server is one process,
  so the registered rewards split their batch over the devices this process owns, never the
  global mesh (whose other processes are not in the call)."""
  if not data_parallel:
    return None
  from htgrpo_jax import parallel

  return parallel.make_mesh(data=-1, fsdp=1, tensor=1, devices=jax.local_devices())


def local_path(value: str, option: str) -> str:
  """A local path holding ``value``'s file or dir: ``value`` itself, or for a URL (``gs://...``)
  a local copy (``paths.local_copy``: the checkpoint readers need a local file system); a
  ValueError naming ``option`` when there is nothing there."""
  if isinstance(value, str) and value and paths.is_url(value):
    if not paths.exists(value):
      raise ValueError(f"{option}={value!r}: no such file or directory")
    return paths.local_copy(value)
  if not isinstance(value, str) or not value or not os.path.exists(value):
    raise ValueError(f"{option}={value!r}: no such local file or directory")
  return value


def load_clip_options(
    checkpoint: str,
    tokenizer: str,
    layout: str,
    preset: str,
    mesh,
    names: Sequence[str] = ("checkpoint", "tokenizer", "layout", "preset"),
) -> CLIPBundle:
  """``load_clip`` from a reward's string options ("" = unset), with errors naming the option at
  fault (``names``: how the reward calls its checkpoint, tokenizer, layout and preset options)."""
  n_ckpt, n_tok, n_layout, n_preset = names
  checkpoint = local_path(checkpoint, n_ckpt)
  if tokenizer:
    tokenizer = local_path(tokenizer, n_tok)
  if layout not in LAYOUTS:
    raise ValueError(f"{n_layout}={layout!r}: must be one of {LAYOUTS}")
  if preset and preset not in clip.PRESETS:
    raise ValueError(f"{n_preset}={preset!r}: must be one of {tuple(clip.PRESETS)} ('' = config.json)")
  if layout == "open_clip" and not (preset and tokenizer):
    raise ValueError(
        f"{n_layout}='open_clip' needs {n_preset} (one of {tuple(clip.PRESETS)}) and {n_tok} " "(a local tokenizer dir)"
    )
  return load_clip(checkpoint, tokenizer or None, layout=layout, config=preset or None, mesh=mesh)


@REWARDS.register("clipscore")
def build_clipscore(
    checkpoint: str,
    tokenizer: str = "",
    layout: str = "hf",
    preset: str = "",
    scale: float = 2.5,
    prefix: str = "",
    data_parallel: bool = True,
    name: str = "clipscore",
) -> CLIPScore:
  """CLIPScore ``scale * max(cos, 0)`` of a local CLIP checkpoint (``load_clip``).

  Args:
    checkpoint: an HF ``CLIPModel`` dir (``layout='hf'``) or an open_clip safetensors file / dir.
    tokenizer: a local tokenizer dir ("" = ``checkpoint``; required for open_clip).
    layout: 'hf' or 'open_clip'.
    preset: a ``models.clip.PRESETS`` name ("" = the HF dir's config.json; required for open_clip).
    scale: Hessel et al.'s w (``CLIPScore``'s weight; ``weight`` in a ``config.rewards`` entry is
      the weighted sum's).
    prefix: prepended to every prompt (Hessel et al.: "A photo depicts ").
    data_parallel: split each batch over this process's devices (``local_mesh``).
  """
  if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale <= 0:
    raise ValueError(f"scale={scale!r}: must be a positive number")
  mesh = local_mesh(data_parallel)
  reward = CLIPScore(
      load_clip_options(checkpoint, tokenizer, layout, preset, mesh), weight=scale, prefix=prefix, mesh=mesh
  )
  reward.name = name
  return reward
