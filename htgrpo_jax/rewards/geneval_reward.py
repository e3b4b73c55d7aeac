"""A GenEval-style reward on the accelerator: OWLv2 detections + CLIP colours -> GenEval's rules.

Per batch (``GenEvalReward.__call__(prompts, images, meta=[record, ...])``):
  1. on device, one jitted program: OWL preprocessing (pad to square, resize, normalise) and the
     detector on every image, with each image's queries "a photo of a {class}" for the classes its
     GenEval record names (embedded once per class name and cached);
  2. on the host: per patch its best query and sigmoid score (``owl.detections``), greedy NMS per
     class (OWL predicts one box per patch; GenEval's Mask2Former de-duplicates itself);
  3. on device, one jitted program: GenEval's CLIP colour classifier on the kept objects of every
     class that a colour clause asks about (boxes only: OWL gives no masks, so the crop is the whole
     box, as GenEval does for mask-less detections);
  4. ``geneval.evaluate`` on the detections and the record: the dense score (RL) or the strict 0/1.

This is not the official GenEval: the official numbers come from a Mask2Former (mmdet) detector
with its own scores and masks; OWLv2 is a different, open-vocabulary detector, so the scores are
GenEval-*style* and not comparable with published GenEval numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from htgrpo_jax.models import clip, owl
from htgrpo_jax.rewards import geneval
from htgrpo_jax.rewards.base import check_images
from htgrpo_jax.rewards.clip import (ColorClassifier, load_clip_options, local_mesh, local_path, on_mesh, to_numpy)
from htgrpo_jax.rewards.registry import REWARDS

MODES = ("dense", "strict")


@dataclasses.dataclass(frozen=True)
class OwlBundle:
  """An OWL detector ready to run: ``config`` (``owl.OwlConfig``), ``params``, ``tokenizer``."""

  config: owl.OwlConfig
  params: Any
  tokenizer: Any


def load_owl(
    checkpoint: str, tokenizer: str | None = None, *, config: owl.OwlConfig | str | None = None, mesh=None
) -> OwlBundle:
  """HF ``Owlv2ForObjectDetection`` / ``OwlViTForObjectDetection`` dir (+ a local tokenizer dir,
  default the checkpoint dir) -> ``OwlBundle``. ``config``: an ``OwlConfig``, a preset name, or None
  (``config.json``)."""
  from htgrpo_jax.models import clip_convert

  if isinstance(config, str):
    if config not in owl.PRESETS:
      raise ValueError(f"load_owl: config={config!r} is not a preset ({tuple(owl.PRESETS)})")
    config = owl.PRESETS[config]
  config, params = clip_convert.load_owl(checkpoint, config, mesh=mesh)
  return OwlBundle(config, params, clip.load_tokenizer(tokenizer or checkpoint))


@functools.partial(jax.jit, static_argnames=("config",))
def detect_images(
    params: Any, images: jax.Array, queries: jax.Array, query_mask: jax.Array, config: owl.OwlConfig
) -> dict[str, jax.Array]:
  """``uint8[B, H, W, 3]`` images and ``float32[B, Q, P]`` queries -> OWL outputs (logits
  ``[B, N, Q]``, boxes ``[B, N, 4]`` relative to the padded square, objectness ``[B, N]``)."""
  pixels = owl.preprocess(images, config.clip.vision.image_size)
  return owl.detect(params, pixels, queries, query_mask, config)


def _record(meta: Any, i: int, name: str = "geneval") -> Mapping[str, Any]:
  if isinstance(meta, str):
    try:
      meta = json.loads(meta)
    except json.JSONDecodeError as e:
      raise ValueError(f"reward {name!r}: meta[{i}] is not JSON ({e})") from None
  if not isinstance(meta, Mapping) or "include" not in meta:
    raise ValueError(f"reward {name!r}: meta[{i}] must be a GenEval record with 'include', got {meta!r:.200}")
  return meta


def _classes(record: Mapping[str, Any]) -> list[str]:
  names = [c["class"] for c in list(record.get("include", [])) + list(record.get("exclude", []))]
  return list(dict.fromkeys(names))


def _bucket(n: int) -> int:
  """Padded size (powers of two) so that a few shapes cover every batch: no recompiles per step."""
  return 1 << max(0, (max(n, 1) - 1).bit_length())


class GenEvalReward:
  """GenEval-style reward ``(prompts, images, meta=[record, ...]) -> float32[B]`` (module docstring).

  Args:
    detector: an ``OwlBundle``.
    colors: a ``rewards.clip.ColorClassifier`` (None: colour clauses see no colour and fail).
    mode: 'dense' (``Verdict.dense``, partial credit, for RL) or 'strict' (GenEval's 0/1).
    variant / ties: passed to ``geneval.evaluate``.
    query_template: the detector's text query per class.
    box_threshold: detections below this score are dropped before NMS (GenEval's own 0.3 / 0.9
      thresholds are applied by ``evaluate``).
    nms_iou: greedy NMS IoU per class (None: no NMS).
    mesh: run the detector data-parallel over this mesh (load its params with ``mesh=``; give the
      colour classifier the mesh too).
  """

  name = "geneval"

  def __init__(
      self,
      detector: OwlBundle,
      colors: ColorClassifier | None = None,
      *,
      mode: str = "dense",
      variant: str = "geneval",
      ties: str = "first",
      query_template: str = "a photo of a {object}",
      box_threshold: float = 0.1,
      nms_iou: float | None = 0.5,
      mesh=None,
  ):
    if mode not in MODES:
      raise ValueError(f"GenEvalReward: mode={mode!r}; expected one of {MODES}")
    if variant not in geneval.VARIANTS or ties not in geneval.TIES:
      raise ValueError(
          f"GenEvalReward: variant={variant!r} / ties={ties!r}; expected one of " f"{geneval.VARIANTS} / {geneval.TIES}"
      )
    if "{object}" not in query_template:
      raise ValueError(f"GenEvalReward: query_template {query_template!r} has no {{object}} field")
    self.detector, self.colors, self.mode = detector, colors, mode
    self.variant, self.ties, self.template = variant, ties, query_template
    self.box_threshold, self.nms_iou = float(box_threshold), nms_iou
    self._queries: dict[str, np.ndarray] = {}
    self.mesh = mesh

  def query(self, classname: str) -> np.ndarray:
    """``float32[P]`` the detector's unit query embedding of ``classname`` (cached)."""
    if classname not in self._queries:
      d = self.detector
      ids = clip.tokenize(d.tokenizer, [self.template.format(object=classname)], d.config.clip.text.max_length)
      if ids.max() >= d.config.clip.text.vocab_size:
        raise ValueError(
            f"reward {self.name!r}: the tokenizer gives id {int(ids.max())} but the detector's "
            f"vocab_size is {d.config.clip.text.vocab_size}"
        )
      self._queries[classname] = np.asarray(owl.text_queries(d.params, jnp.asarray(ids), d.config))[0]
    return self._queries[classname]

  def detections(self, images: np.ndarray, records: Sequence[Mapping[str, Any]]) -> list[dict[str, list[dict]]]:
    """Per image, ``{class: [{"box", "score", "color"?}, ...]}`` as ``geneval.evaluate`` takes."""
    b, h, w = images.shape[:3]
    classes = [_classes(r) for r in records]
    q = _bucket(max(len(c) for c in classes))
    p = self.detector.config.clip.projection_dim
    queries, mask = np.zeros((b, q, p), np.float32), np.zeros((b, q), bool)
    for i, names in enumerate(classes):
      for j, name in enumerate(names):
        queries[i, j], mask[i, j] = self.query(name), True
    x, qs, m = on_mesh(self.mesh, images, queries, mask)
    out = detect_images(self.detector.params, x, qs, m, self.detector.config)
    logits, boxes = to_numpy(out["logits"], b), to_numpy(out["boxes"], b)
    dets = []
    for i, names in enumerate(classes):
      d = owl.detections(
          logits[i], boxes[i], names, side=max(h, w), threshold=self.box_threshold, max_per_class=geneval.MAX_OBJECTS
      )
      if self.nms_iou is not None:
        d = {c: owl.nms(objs, self.nms_iou) for c, objs in d.items()}
      dets.append(d)
    self._add_colors(images, records, dets)
    return dets

  def _add_colors(self, images, records, dets) -> None:
    """Classifies the colour of every kept object of a class some colour clause names (batched)."""
    if self.colors is None:
      return
    todo = []  # (image, class, object)
    for i, (r, d) in enumerate(zip(records, dets)):
      thr = geneval.COUNTING_SCORE_THRESHOLD if r.get("tag") == "counting" else geneval.SCORE_THRESHOLD
      for name in dict.fromkeys(c["class"] for c in r["include"] if c.get("color")):
        todo += [(i, name, o) for o in d.get(name, []) if o["score"] > thr]
    if not todo:
      return
    per_image = [[t for t in todo if t[0] == i] for i in range(len(dets))]
    k = _bucket(max(len(t) for t in per_image))
    boxes = np.zeros((len(dets), k, 4), np.float32)
    boxes[..., 2:] = 1.0
    names = [["object"] * k for _ in dets]
    for i, items in enumerate(per_image):
      for j, (_, name, o) in enumerate(items):
        boxes[i, j], names[i][j] = o["box"], name
    logits = self.colors.logits(images, boxes, names)
    for i, items in enumerate(per_image):
      for j, (_, _, o) in enumerate(items):
        o["color"] = self.colors.colors[int(logits[i, j].argmax())]

  def judge(
      self, prompts: Sequence[str], images: np.ndarray, meta: Sequence[Any] | None = None, **columns: Any
  ) -> list[geneval.Verdict]:
    """``geneval.Verdict`` per image."""
    images = check_images(self.name, prompts, images)
    if meta is None or len(meta) != len(prompts):
      raise ValueError(
          f"reward {self.name!r}: needs meta= with one GenEval record per prompt "
          f"({len(prompts)}), got {None if meta is None else len(meta)}"
      )
    records = [_record(m, i, self.name) for i, m in enumerate(meta)]
    dets = self.detections(images, records)
    return [geneval.evaluate(d, r, variant=self.variant, ties=self.ties) for d, r in zip(dets, records)]

  def __call__(
      self, prompts: Sequence[str], images: np.ndarray, meta: Sequence[Any] | None = None, **columns: Any
  ) -> np.ndarray:
    verdicts = self.judge(prompts, images, meta)
    return np.asarray([v.dense if self.mode == "dense" else v.strict for v in verdicts], np.float32)


@REWARDS.register("geneval_owl")
def build_geneval_owl(
    detector: str,
    clip: str,
    detector_tokenizer: str = "",
    detector_preset: str = "",
    clip_tokenizer: str = "",
    clip_layout: str = "hf",
    clip_preset: str = "",
    mode: str = "dense",
    variant: str = "geneval",
    ties: str = "first",
    query_template: str = "a photo of a {object}",
    box_threshold: float = 0.1,
    nms_iou: float | None = 0.5,
    data_parallel: bool = True,
    name: str = "geneval_owl",
) -> GenEvalReward:
  """The GenEval-style reward of local OWL + CLIP checkpoints (``GenEvalReward``).

  Args:
    detector: an HF ``Owlv2ForObjectDetection`` / ``OwlViTForObjectDetection`` dir.
    clip: the CLIP checkpoint of GenEval's colour classifier (GenEval: ViT-L/14, OpenAI weights):
      an HF ``CLIPModel`` dir, or open_clip safetensors with ``clip_layout='open_clip'``.
    detector_tokenizer / clip_tokenizer: tokenizer dirs ("" = the checkpoint dir).
    detector_preset: a ``models.owl.PRESETS`` name ("" = the dir's config.json).
    clip_layout / clip_preset: as ``clipscore``'s ``layout`` / ``preset``.
    mode: 'dense' (partial credit, for RL) or 'strict' (GenEval's 0/1, for evaluation).
    variant, ties, query_template, box_threshold, nms_iou: ``GenEvalReward``'s.
    data_parallel: split each batch over this process's devices (``rewards.clip.local_mesh``).
  """
  detector = local_path(detector, "detector")  # a gs:// dir: a local copy
  if detector_tokenizer:
    detector_tokenizer = local_path(detector_tokenizer, "detector_tokenizer")
  if detector_preset and detector_preset not in owl.PRESETS:
    raise ValueError(f"detector_preset={detector_preset!r}: must be one of {tuple(owl.PRESETS)} " "('' = config.json)")
  num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
  if not (num(box_threshold) and 0 <= box_threshold < 1):
    raise ValueError(f"box_threshold={box_threshold!r}: must be a number in [0, 1)")
  if nms_iou is not None and not (num(nms_iou) and 0 < nms_iou <= 1):
    raise ValueError(f"nms_iou={nms_iou!r}: must be a number in (0, 1] or None (no NMS)")
  mesh = local_mesh(data_parallel)
  names = ("clip", "clip_tokenizer", "clip_layout", "clip_preset")
  colors = ColorClassifier(
      load_clip_options(clip, clip_tokenizer, clip_layout, clip_preset, mesh, names=names), mesh=mesh
  )
  owl_bundle = load_owl(detector, detector_tokenizer or None, config=detector_preset or None, mesh=mesh)
  reward = GenEvalReward(
      owl_bundle,
      colors,
      mode=mode,
      variant=variant,
      ties=ties,
      query_template=query_template,
      box_threshold=box_threshold,
      nms_iou=nms_iou,
      mesh=mesh,
  )
  reward.name = name
  return reward
