"""OWL-ViT / OWLv2 open-vocabulary detectors (Minderer et al., 2022 / 2023) in Flax Linen.

Both are a CLIP (``models.clip``, towers reused as they are) whose vision tower keeps its patch
tokens, plus per-patch heads (HF ``OwlViTForObjectDetection`` / ``Owlv2ForObjectDetection``):

  tokens = vision_model(pixels)                      [B, 1 + N, D]   (post_layernorm on every token)
  feats = layer_norm(tokens[:, 1:] * tokens[:, :1])   [B, N, D]       (N = (S/p)^2 patches, row-major)
  queries = normalize(text_projection(text_model(ids).pooled))        [Q, P]  (text pooled at argmax(ids))
  class head: e = dense0(feats); logits = (cos'(e, q) + logit_shift(feats)) * (elu(logit_scale(feats)) + 1)
              (cos' divides by norm + 1e-6 as HF does); padded queries -> float32 min
  box head:   sigmoid(dense2(gelu(dense1(gelu(dense0(feats))))) + box_bias)  [B, N, 4] (cx, cy, w, h) in [0, 1]
  objectness (OWLv2 only): the box head's MLP with one output             [B, N]
  box_bias: logit of each patch's grid corner (its centre prior) and of the patch size

Boxes are relative to the (square) model input; ``detections`` turns the outputs into the per-class
lists that ``rewards.geneval.evaluate`` takes. The HF image processors differ: OWLv2 pads to a square
with grey (0.5) at the bottom/right and resizes, OWL-ViT resizes without keeping the aspect ratio;
``preprocess`` here does OWLv2's for square or padded inputs with a bilinear antialiased resize (not
the HF processor's scipy-based one, so its pixels agree with HF's only approximately).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from htgrpo_jax.models import clip

KINDS = ("owlv2", "owlvit")


@dataclasses.dataclass(frozen=True)
class OwlConfig:
  """``clip``: the CLIP towers (text pooled at argmax(ids): ``clip.text.eos_token_id`` None);
  ``kind``: 'owlv2' (objectness head) or 'owlvit'."""

  clip: clip.CLIPConfig
  kind: str = "owlv2"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"OwlConfig.kind={self.kind!r}; expected one of {KINDS}")
    if self.clip.text.eos_token_id is not None:
      raise ValueError("OwlConfig: OWL pools text at argmax(ids); clip.text.eos_token_id must be None")
    if self.clip.projection_dim != self.clip.text.hidden_size:
      raise ValueError(
          f"OwlConfig: the class head maps patches to text.hidden_size "
          f"({self.clip.text.hidden_size}), which must equal projection_dim ({self.clip.projection_dim})"
      )

  @property
  def grid(self) -> int:
    return self.clip.vision.grid


def _owl_clip(vision: dict, text: dict, proj: int) -> clip.CLIPConfig:
  # OWL's text tower has 16 positions (queries are short class names).
  return clip.CLIPConfig(
      vision=clip.VisionConfig(**vision), text=clip.TextConfig(max_length=16, **text), projection_dim=proj
  )


PRESETS: dict[str, OwlConfig] = {
    # google/owlv2-base-patch16(-ensemble): 960 px, 60 x 60 patches.
    "owlv2_b16": OwlConfig(_owl_clip(dict(patch_size=16, image_size=960), {}, 512)),
    # google/owlv2-large-patch14(-ensemble): 1008 px, 72 x 72 patches.
    "owlv2_l14": OwlConfig(
        _owl_clip(
            dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_size=4096, patch_size=14, image_size=1008),
            dict(hidden_size=768, num_heads=12, mlp_size=3072),
            768,
        )
    ),
    # google/owlvit-base-patch32: 768 px, 24 x 24 patches.
    "owlvit_b32": OwlConfig(_owl_clip(dict(patch_size=32, image_size=768), {}, 512), kind="owlvit"),
}


def from_hf_config(hf: Any, kind: str | None = None, **kw) -> OwlConfig:
  """``OwlConfig`` from a transformers ``Owlv2Config`` / ``OwlViTConfig`` (or its dict)."""
  hf = hf if isinstance(hf, dict) else hf.to_dict()
  kind = kind or ("owlvit" if hf.get("model_type") == "owlvit" else "owlv2")
  c = clip.from_hf_config(hf, **kw)
  return OwlConfig(dataclasses.replace(c, text=dataclasses.replace(c.text, eos_token_id=None)), kind)


def box_bias(grid: int) -> np.ndarray:
  """``float32[grid^2, 4]``: HF's ``compute_box_bias`` (logit of the patch's bottom-right grid
  corner, logit of the patch size), row-major over patches."""
  xy = np.stack(np.meshgrid(np.arange(1, grid + 1), np.arange(1, grid + 1), indexing="xy"), -1)
  xy = np.clip(xy.reshape(-1, 2).astype(np.float32) / grid, 0.0, 1.0)
  coord = np.log(xy + 1e-4) - np.log1p(-xy + 1e-4)
  size = np.full_like(coord, 1.0 / grid)
  size = np.log(size + 1e-4) - np.log1p(-size + 1e-4)
  return np.concatenate([coord, size], -1).astype(np.float32)


class MLPHead(nn.Module):
  """``dense2(gelu(dense1(gelu(dense0(x)))))`` (exact GELU), HF's box / objectness head."""

  out: int
  config: clip.CLIPConfig

  @nn.compact
  def __call__(self, x):
    c, d = self.config, x.shape[-1]
    dense = lambda n, name: nn.Dense(n, dtype=c.dtype, param_dtype=c.param_dtype, name=name)
    x = jax.nn.gelu(dense(d, "dense0")(x), approximate=False)
    x = jax.nn.gelu(dense(d, "dense1")(x), approximate=False)
    return dense(self.out, "dense2")(x)


class ClassHead(nn.Module):
  """feats ``[B, N, D]``, queries ``[B, Q, P]``, mask ``bool[B, Q]`` -> logits ``float32[B, N, Q]``."""

  config: clip.CLIPConfig

  @nn.compact
  def __call__(self, feats, queries, query_mask=None):
    c = self.config
    dense = lambda n, name: nn.Dense(n, dtype=c.dtype, param_dtype=c.param_dtype, name=name)
    e = dense(c.text.hidden_size, "dense0")(feats).astype(jnp.float32)
    e = e / (jnp.linalg.norm(e, axis=-1, keepdims=True) + 1e-6)
    q = queries.astype(jnp.float32)
    q = q / (jnp.linalg.norm(q, axis=-1, keepdims=True) + 1e-6)
    logits = jnp.einsum("bnp,bqp->bnq", e, q)
    shift = dense(1, "logit_shift")(feats).astype(jnp.float32)
    scale = jax.nn.elu(dense(1, "logit_scale")(feats).astype(jnp.float32)) + 1.0
    logits = (logits + shift) * scale
    if query_mask is not None:
      logits = jnp.where(query_mask[:, None, :], logits, jnp.finfo(jnp.float32).min)
    return logits


class OwlDetector(nn.Module):
  """The detector. ``__call__(pixels [B, S, S, 3], ids [B*Q, L])`` mirrors HF's forward (queries
  grouped per image, a query whose first id is 0 is padding) and returns a dict:
  ``logits float32[B, N, Q]``, ``boxes float32[B, N, 4]`` (cx, cy, w, h in [0, 1]),
  ``objectness float32[B, N]`` (OWLv2; zeros for OWL-ViT), ``feats [B, N, D]``.

  ``text_queries(ids)`` -> ``[M, P]`` unit query embeddings; ``detect(pixels, queries [B, Q, P],
  query_mask)`` the same dict for precomputed queries (class names are embedded once, reused).
  """

  config: OwlConfig

  def setup(self):
    c = self.config.clip
    self.clip = clip.CLIP(c)
    self.class_head = ClassHead(c)
    self.box_head = MLPHead(4, c)
    if self.config.kind == "owlv2":
      self.objectness_head = MLPHead(1, c)
    self.layer_norm = nn.LayerNorm(
        epsilon=c.vision.layer_norm_eps, use_fast_variance=False, dtype=c.dtype, param_dtype=c.param_dtype
    )

  def image_feats(self, pixels):
    tokens = self.clip.vision_model(pixels)
    return self.layer_norm(tokens[:, 1:] * tokens[:, :1])

  def text_queries(self, ids):
    return clip.normalize(self.clip.text_projection(self.clip.text_model(ids)[1]))

  def detect(self, pixels, queries, query_mask=None):
    feats = self.image_feats(pixels)
    logits = self.class_head(feats, queries, query_mask)
    bias = jnp.asarray(box_bias(self.config.grid))
    boxes = jax.nn.sigmoid(self.box_head(feats).astype(jnp.float32) + bias)
    if self.config.kind == "owlv2":
      obj = self.objectness_head(feats)[..., 0].astype(jnp.float32)
    else:
      obj = jnp.zeros(feats.shape[:2], jnp.float32)
    return {"logits": logits, "boxes": boxes, "objectness": obj, "feats": feats}

  def __call__(self, pixels, ids):
    b = pixels.shape[0]
    queries = self.text_queries(ids).reshape(b, ids.shape[0] // b, -1)
    mask = ids.reshape(b, ids.shape[0] // b, -1)[..., 0] > 0
    # Initialise the unused CLIP parts too (visual_projection, logit_scale) so params match checkpoints.
    if self.is_initializing():
      self.clip.encode_image(pixels)
    return self.detect(pixels, queries, mask)


def init_params(config: OwlConfig, seed: int = 0) -> Any:
  s, n = config.clip.vision.image_size, config.clip.text.max_length
  return OwlDetector(config).init(jax.random.key(seed), jnp.zeros((1, s, s, 3)), jnp.ones((1, n), jnp.int32))["params"]


@functools.partial(jax.jit, static_argnames=("config",))
def text_queries(params: Any, ids: jax.Array, config: OwlConfig) -> jax.Array:
  """``float32[M, P]`` unit query embeddings of ``ids int32[M, L]``."""
  return OwlDetector(config).apply({"params": params}, ids, method="text_queries")


@functools.partial(jax.jit, static_argnames=("config",))
def detect(
    params: Any, pixels: jax.Array, queries: jax.Array, query_mask: jax.Array | None, config: OwlConfig
) -> dict[str, jax.Array]:
  """Jitted ``OwlDetector.detect`` without ``feats``: normalised ``pixels [B, S, S, 3]``, ``queries
  float32[B, Q, P]``, ``query_mask bool[B, Q]`` (or None)."""
  out = OwlDetector(config).apply({"params": params}, pixels, queries, query_mask, method="detect")
  return {k: v for k, v in out.items() if k != "feats"}


@functools.partial(jax.jit, static_argnames=("size",))
def preprocess(images: jax.Array, size: int) -> jax.Array:
  """``uint8[B, H, W, 3]`` -> ``float32[B, size, size, 3]``: pad bottom/right to a square with grey
  0.5 (OWLv2's processor), antialiased bilinear resize, CLIP normalisation. Boxes then are
  relative to the padded square (side ``max(H, W)``)."""
  from htgrpo_jax.models import clip_image

  b, h, w = images.shape[:3]
  side = max(h, w)
  x = images.astype(jnp.float32) / 255.0
  x = jnp.pad(x, ((0, 0), (0, side - h), (0, side - w), (0, 0)), constant_values=0.5)
  x = jax.image.resize(x, (b, size, size, 3), "linear", antialias=True)
  return (x - jnp.asarray(clip_image.OPENAI_MEAN)) / jnp.asarray(clip_image.OPENAI_STD)


def to_corners(boxes: np.ndarray, side: float) -> np.ndarray:
  """(cx, cy, w, h) in [0, 1] -> (x0, y0, x1, y1) pixels of a ``side``-pixel square."""
  boxes = np.asarray(boxes, np.float64)
  cxcy, wh = boxes[..., :2], boxes[..., 2:]
  return np.concatenate([cxcy - wh / 2, cxcy + wh / 2], -1) * side


def detections(
    logits: np.ndarray,
    boxes: np.ndarray,
    classes: Sequence[str],
    side: float,
    threshold: float = 0.1,
    max_per_class: int = 16,
) -> dict[str, list[dict]]:
  """One image's outputs -> ``{class: [{"box": (x0, y0, x1, y1), "score": p}, ...]}`` for
  ``rewards.geneval.evaluate``.

  As HF's ``post_process_object_detection``: each patch is assigned its best query (argmax of the
  logits) with score sigmoid(max logit), kept when the score exceeds ``threshold``; here also the
  ``max_per_class`` highest per class (GenEval keeps at most 16 anyway). No NMS: OWL predicts one box
  per patch, so one object can fire several patches; GenEval's counting relies on its detector's
  own de-duplication, and ``nms`` below gives that to OWL outputs.

  Args:
    logits: ``float[N, Q]``; boxes: ``float[N, 4]`` (cx, cy, w, h) relative; classes: Q names
      (queries past ``len(classes)`` are ignored); side: the model input's square side in the
      image's pixels (``max(H, W)`` for OWLv2's padding).
  """
  logits = np.asarray(logits, np.float64)[:, : len(classes)]
  best = logits.argmax(-1)
  score = 1.0 / (1.0 + np.exp(-logits.max(-1)))
  corners = to_corners(boxes, side)
  out: dict[str, list[dict]] = {c: [] for c in classes}
  for q, name in enumerate(classes):
    idx = np.flatnonzero((best == q) & (score > threshold))
    idx = idx[np.argsort(-score[idx], kind="stable")][:max_per_class]
    out[name].extend({"box": tuple(float(v) for v in corners[i]), "score": float(score[i])} for i in idx)
  return out


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Pairwise IoU of corner boxes ``[n, 4]`` x ``[m, 4]``."""
  a, b = np.asarray(a, np.float64)[:, None], np.asarray(b, np.float64)[None]
  wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None)
  inter = wh[..., 0] * wh[..., 1]
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def nms(objects: list[dict], threshold: float = 0.5) -> list[dict]:
  """Greedy non-maximum suppression of one class's ``{"box", "score"}`` list (highest score first)."""
  objects = sorted(objects, key=lambda o: -o["score"])
  keep: list[dict] = []
  for o in objects:
    if not keep or iou(np.asarray([o["box"]]), np.asarray([k["box"] for k in keep])).max() <= threshold:
      keep.append(o)
  return keep
