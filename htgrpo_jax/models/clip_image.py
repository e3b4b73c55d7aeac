"""CLIP's image preprocessing in JAX, jittable, with boxes as traced values.

The reference is open_clip's eval transform (what GenEval and most CLIP evaluations run), a
torchvision pipeline on a PIL image:

  crop(round(box))                   PIL ``Image.crop`` (GenEval crops each object to its box)
  Resize(S, BICUBIC)                 shortest side -> S, the other int(S * long / short); PIL's
                                     separable bicubic (a = -0.5), antialiased when shrinking
                                     (kernel widened by in/out), horizontal pass then vertical,
                                     each rounded to uint8
  CenterCrop(S)                      top/left = round((resized - S) / 2) (Python's half-to-even)
  ToTensor, Normalize(mean, std)     OpenAI's CLIP mean/std

Every step is a linear map along one axis, so crop + resize + centre crop of one axis is one
``[S, in]`` weight matrix computed from the (traced) box: no shapes depend on the box and a batch of
boxes of different sizes is one compiled program. ``pil_rounding`` rounds each pass to uint8 as
PIL does, which makes the result equal to PIL's up to its fixed-point rounding (measured in
tests/models/test_clip.py: at most 2 of 255, on under 1% of values; 0 elsewhere). HF's
``CLIPImageProcessor`` differs only in its centre-crop rounding (floor) for odd margins.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def cubic(t: jax.Array, a: float = -0.5) -> jax.Array:
  """PIL's bicubic kernel (Keys, a = -0.5), support [-2, 2]."""
  t = jnp.abs(t)
  near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
  far = (((t - 5.0) * t + 8.0) * t - 4.0) * a
  return jnp.where(t < 1.0, near, jnp.where(t < 2.0, far, 0.0))


def axis_weights(
    in_size: int, start: jax.Array, length: jax.Array, resized: jax.Array, offset: jax.Array, out: int
) -> jax.Array:
  """``float32[out, in_size]``: crop ``[start, start + length)``, bicubic-resize it to ``resized``
  samples and keep samples ``[offset, offset + out)``, along one axis (PIL's coefficients: output
  sample r reads crop position ``(r + 0.5) * length / resized``, kernel widened by
  ``max(length / resized, 1)``, weights renormalised over the pixels inside the crop)."""
  start, length = jnp.asarray(start, jnp.float32), jnp.asarray(length, jnp.float32)
  scale = length / jnp.asarray(resized, jnp.float32)
  centre = (jnp.arange(out, dtype=jnp.float32) + jnp.asarray(offset, jnp.float32) + 0.5) * scale
  width = jnp.maximum(scale, 1.0)
  x = jnp.arange(in_size, dtype=jnp.float32) - start  # crop coordinate of each input pixel
  w = cubic((x[None, :] + 0.5 - centre[:, None]) / width) * ((x >= 0) & (x < length))[None, :]
  return w / w.sum(axis=1, keepdims=True)


def box_weights(box: jax.Array, height: int, width: int, size: int) -> tuple[jax.Array, jax.Array]:
  """``(wy float32[size, height], wx float32[size, width])`` for one box ``(x0, y0, x1, y1)`` in pixels.

  The box is rounded as ``PIL.Image.crop`` does, clipped to the image and at least one pixel wide
  (PIL would pad outside the image with black; a detector's box may poke out by a pixel).
  """
  box = jnp.round(jnp.asarray(box, jnp.float32)).astype(jnp.int32)
  x0, x1 = jnp.clip(box[0], 0, width - 1), jnp.clip(box[2], 0, width)
  y0, y1 = jnp.clip(box[1], 0, height - 1), jnp.clip(box[3], 0, height)
  w, h = jnp.maximum(x1 - x0, 1), jnp.maximum(y1 - y0, 1)
  # torchvision: shortest side -> size, the other int(size * long / short) (integer floor here).
  rw = jnp.where(w <= h, size, (size * w) // h)
  rh = jnp.where(w <= h, (size * h) // w, size)
  # CenterCrop: int(round((resized - size) / 2.0)); jnp.round is half-to-even like Python's.
  ox = jnp.round((rw - size) / 2.0)
  oy = jnp.round((rh - size) / 2.0)
  return (axis_weights(height, y0, h, rh, oy, size), axis_weights(width, x0, w, rw, ox, size))


def _round8(x: jax.Array) -> jax.Array:
  return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def crop_resize(image: jax.Array, box: jax.Array, size: int, pil_rounding: bool = True) -> jax.Array:
  """One image ``[H, W, 3]`` (0..255) and box -> ``float32[size, size, 3]`` in 0..255 (see module doc)."""
  h, w = image.shape[:2]
  wy, wx = box_weights(box, h, w, size)
  x = image.astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST  # exact fp32: TPU's default bf16 passes would cost ~1/255
  x = jnp.einsum("ow,hwc->hoc", wx, x, precision=hp)  # PIL: horizontal pass first
  if pil_rounding:
    x = _round8(x)
  x = jnp.einsum("ph,hoc->poc", wy, x, precision=hp)
  return _round8(x) if pil_rounding else x


def normalize(pixels: jax.Array, mean=OPENAI_MEAN, std=OPENAI_STD) -> jax.Array:
  """0..255 values ``[..., 3]`` -> ``(x / 255 - mean) / std`` in float32 (ToTensor + Normalize)."""
  return (pixels.astype(jnp.float32) / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


@functools.partial(jax.jit, static_argnames=("size", "pil_rounding"))
def preprocess(
    images: jax.Array, size: int = 224, pil_rounding: bool = True, mean=OPENAI_MEAN, std=OPENAI_STD
) -> jax.Array:
  """``uint8[B, H, W, 3]`` -> CLIP input ``float32[B, size, size, 3]`` (resize shortest side, centre
  crop, normalise), as open_clip's eval transform on the whole image."""
  b, h, w = images.shape[:3]
  box = jnp.asarray([0, 0, w, h], jnp.float32)
  crop = jax.vmap(lambda im: crop_resize(im, box, size, pil_rounding))(images)
  return normalize(crop, mean, std)


@functools.partial(jax.jit, static_argnames=("size", "pil_rounding"))
def preprocess_boxes(
    images: jax.Array,
    boxes: jax.Array,
    masks: jax.Array | None = None,
    background=(153, 153, 153),
    size: int = 224,
    pil_rounding: bool = True,
    mean=OPENAI_MEAN,
    std=OPENAI_STD,
) -> jax.Array:
  """GenEval's object crops: each object's mask composited on ``background`` (#999999), cropped to
  its box, preprocessed.

  Args:
    images: ``uint8[B, H, W, 3]``.
    boxes: ``float[B, K, 4]`` (x0, y0, x1, y1) in pixels.
    masks: ``bool[B, K, H, W]`` or None (the whole box is used, as GenEval does without masks).
    background: RGB of the pixels outside the mask.

  Returns:
    ``float32[B, K, size, size, 3]`` CLIP inputs.
  """
  bg = jnp.asarray(background, jnp.float32)

  def one(image, box, mask):
    im = image.astype(jnp.float32)
    if mask is not None:
      im = jnp.where(mask[..., None], im, bg)
    return crop_resize(im, box, size, pil_rounding)

  per_obj = jax.vmap(one, in_axes=(None, 0, 0 if masks is not None else None))
  crops = jax.vmap(per_obj, in_axes=(0, 0, 0 if masks is not None else None))(images, boxes, masks)
  return normalize(crops, mean, std)
