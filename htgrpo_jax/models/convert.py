"""HF LLaDA safetensors (MMaDA-8B, Lumina-DiMOO) -> sharded params pytree -> Orbax checkpoint.

Checkpoint keys (docs/models.md, checkpoint keys; torch Linear weights are [out, in]):

  model.transformer.wte.weight                [V, D]    -> wte                      (as is)
  model.transformer.blocks.{i}.attn_norm.weight [D]     -> attn_norm.scale
  model.transformer.blocks.{i}.{q,k,v}_proj.weight [D, D] -> {q,k,v}_proj.kernel [D, H, Dh] (W.T)
  model.transformer.blocks.{i}.attn_out.weight [D, D]   -> attn_out.kernel [H, Dh, D]  (W.T)
  model.transformer.blocks.{i}.ff_norm.weight  [D]      -> ff_norm.scale
  model.transformer.blocks.{i}.{ff_proj,up_proj}.weight [M, D] -> kernel [D, M]      (W.T)
  model.transformer.blocks.{i}.ff_out.weight   [D, M]   -> ff_out.kernel [M, D]      (W.T)
  model.transformer.ln_f.weight                [D]      -> ln_f.scale
  model.transformer.ff_out.weight              [V, D]   -> lm_head [D, V]            (W.T)

Every key and shape is checked against the preset before any tensor is read. Tensors are read one
at a time (``SafetensorsFile``); each is transformed, cast to ``param_dtype`` and only the slices
this host's devices own are kept, so no host ever holds the whole model. A weight stored as an
integer or bool tensor, or holding NaN/inf, is refused by name (never silently cast), and an
unreadable (e.g. truncated) shard is named by file.

No torch: the files are read and written by ``models/safetensors_io.py`` (numpy + ``ml_dtypes``;
safetensors' own numpy reader refuses BF16, which is how the 8B checkpoints are stored).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import ExitStack
from typing import Any, Callable

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import SingleDeviceSharding

from htgrpo_jax import paths
from htgrpo_jax.models.llada import LLaDAConfig
from htgrpo_jax.models.safetensors_io import SafetensorsFile, open_safetensors, write_safetensors

PREFIX = "model.transformer."
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _block_map(c: LLaDAConfig) -> dict[tuple[str, ...], tuple[str, tuple[int, ...], Callable]]:
  """Our per-block param path -> (HF name, HF shape, transform HF array -> our array)."""
  d, h, dh, m = c.d_model, c.n_heads, c.head_dim, c.mlp_hidden
  ident = lambda w: w
  qkv = lambda w: w.T.reshape(d, h, dh)
  return {
      ("attn_norm", "scale"): ("attn_norm.weight", (d,), ident),
      ("q_proj",): ("q_proj.weight", (d, d), qkv),
      ("k_proj",): ("k_proj.weight", (d, d), qkv),
      ("v_proj",): ("v_proj.weight", (d, d), qkv),
      ("attn_out",): ("attn_out.weight", (d, d), lambda w: w.T.reshape(h, dh, d)),
      ("ff_norm", "scale"): ("ff_norm.weight", (d,), ident),
      ("ff_proj",): ("ff_proj.weight", (m, d), lambda w: w.T),
      ("up_proj",): ("up_proj.weight", (m, d), lambda w: w.T),
      ("ff_out",): ("ff_out.weight", (d, m), lambda w: w.T),
  }


def param_map(c: LLaDAConfig) -> dict[tuple[str, ...], tuple[list[str], tuple[int, ...], Callable]]:
  """Our flat param path -> (HF key per stacked layer (1 if unstacked), HF shape, transform).

  Raises:
    ValueError: the config has parameters LLaDA checkpoints lack (``learned_pos_emb``).
  """
  if c.learned_pos_emb:
    raise ValueError("LLaDA checkpoints have no learned position table; set learned_pos_emb=0")
  v, d = c.vocab_size, c.d_model
  out = {
      ("wte",): ([PREFIX + "wte.weight"], (v, d), lambda w: w),
      ("ln_f", "scale"): ([PREFIX + "ln_f.weight"], (d,), lambda w: w),
      ("lm_head",): ([PREFIX + "ff_out.weight"], (v, d), lambda w: w.T),
  }
  for path, (name, shape, fn) in _block_map(c).items():
    keys = [f"{PREFIX}blocks.{i}.{name}" for i in range(c.n_layers)]
    if c.scan_layers:
      out[("blocks",) + path] = (keys, shape, fn)
    else:
      for i, key in enumerate(keys):
        out[(f"block_{i}",) + path] = ([key], shape, fn)
  return out


def read_index(ckpt_dir: str, index_file: str = INDEX_FILE, single_file: str = SINGLE_FILE) -> dict[str, str]:
  """HF key -> shard file path, from ``index_file`` (``weight_map``) or a single ``single_file``
  in ``ckpt_dir`` (defaults: transformers' names; diffusers' names for VQ decoders)."""
  index = os.path.join(ckpt_dir, index_file)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index} has no 'weight_map' object")
    return {k: os.path.join(ckpt_dir, v) for k, v in weight_map.items()}
  single = os.path.join(ckpt_dir, single_file)
  if os.path.exists(single):
    with open_safetensors(single) as f:
      return {k: single for k in f.keys()}
  raise ValueError(f"{ckpt_dir!r} has neither {index_file} nor {single_file}")


def check_hf_config(ckpt_dir: str, c: LLaDAConfig) -> None:
  """Compares ``config.json`` (when present) with the preset; raises ValueError naming the key."""
  path = os.path.join(ckpt_dir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    hf = json.load(f)
  hf = {**hf, **hf.get("llm_config", {})}
  want = {
      "d_model": c.d_model,
      "n_layers": c.n_layers,
      "n_heads": c.n_heads,
      "mlp_hidden_size": c.mlp_hidden,
      "rope_theta": c.rope_theta,
      "activation_type": "silu",
      "weight_tying": False,
      "rms_norm_eps": c.norm_eps,
  }
  # Vocabulary sizes are checked on the tensors themselves (config.json's fields vary by repo).
  for key, val in want.items():
    if key in hf and hf[key] != val and not (isinstance(val, float) and np.isclose(hf[key], val)):
      raise ValueError(f"config.json {key}={hf[key]!r} does not match the preset ({val!r})")


def checked_weight(key: str, path: str, raw: np.ndarray, arr: np.ndarray) -> np.ndarray:
  """``arr`` (``raw`` transformed and cast to the param dtype) after checking that ``raw`` is a
  floating-point tensor and ``arr`` holds no NaN/inf (a cast can overflow, too).

  Raises:
    ValueError naming the tensor and its file.
  """
  if not jax.numpy.issubdtype(raw.dtype, jax.numpy.floating):
    raise ValueError(
        f"tensor {key} in {path}: dtype {raw.dtype} is not a floating-point type; a "
        "weight is never cast from it (wrong tensor or a quantized checkpoint?)"
    )
  finite = np.isfinite(arr)
  if not finite.all():
    nan = int(np.isnan(arr).sum())
    raise ValueError(
        f"tensor {key} in {path}: non-finite values ({nan} NaN, "
        f"{int((~finite).sum()) - nan} inf, as {arr.dtype}; first at index "
        f"{np.unravel_index(int(np.argmin(finite)), arr.shape)})"
    )
  return arr


def check_names(
    what: str, path: str, files: Any, expected: Any, skip: Callable[[str], bool] = lambda k: False, hint: str = ""
) -> None:
  """Raises ValueError naming the checkpoint and up to 8 keys when a tensor of ``expected`` is not in
  ``files`` or ``files`` holds a tensor neither expected nor ``skip``-ped (``hint`` ends that error)."""
  more = lambda ks: f"{ks[:8]}" + (f" (+{len(ks) - 8} more)" if len(ks) > 8 else "")
  missing = sorted(set(expected) - set(files))
  if missing:
    raise ValueError(f"{what} {path} is missing tensor(s): {more(missing)}")
  extra = sorted(k for k in files if k not in expected and not skip(k))
  if extra:
    raise ValueError(f"{what} {path} has unexpected tensor(s): {more(extra)}{hint}")


def read_replicated(
    reader: "_Reader", pmap: dict[tuple[str, ...], tuple[str, Any, Callable]], dtype: Any, mesh=None
) -> Any:
  """Params pytree of a small model: each ``path -> (key, shape, transform)`` of ``pmap`` read,
  transformed, cast to ``dtype``, checked (``checked_weight``) and replicated over ``mesh`` (or one
  device). Consecutive params of one key (a fused q/k/v) read it once."""
  sharding = None
  if mesh is not None:
    from htgrpo_jax import parallel

    sharding = parallel.replicated(parallel.auto_mesh(mesh))
  out, cache = {}, {}
  for p, (key, _, fn) in pmap.items():
    if key not in cache:
      cache = {key: reader.get(key)}
    raw = cache[key]
    arr = checked_weight(key, reader.path(key), raw, np.asarray(fn(raw)).astype(dtype))
    out[p] = jax.device_put(arr, sharding) if sharding is not None else jax.numpy.asarray(arr)
  return traverse_util.unflatten_dict(out)


class _Reader:
  """Opens each shard once; ``get(key)`` returns a numpy array (bf16 via ml_dtypes)."""

  def __init__(self, files: dict[str, str], stack: ExitStack):
    self._files, self._open, self._stack = files, {}, stack

  def path(self, key) -> str:
    return self._files[key]

  def _handle(self, key) -> SafetensorsFile:
    path = self._files[key]
    if path not in self._open:
      if not os.path.exists(path):
        raise ValueError(f"tensor {key}: shard file {path} does not exist")
      self._open[path] = self._stack.enter_context(open_safetensors(path))
    handle = self._open[path]
    if key not in handle:
      raise ValueError(f"tensor {key}: not found in its shard {path}")
    return handle

  def shape(self, key) -> tuple[int, ...]:
    return self._handle(key).shape(key)

  def get(self, key) -> np.ndarray:
    handle = self._handle(key)
    try:
      return handle.get_tensor(key)
    except ValueError:
      raise
    except OSError as e:  # the shard changed or is damaged
      raise ValueError(
          f"tensor {key}: reading it from {self._files[key]} failed " f"({type(e).__name__}: {e})"
      ) from None


def _place(
    reader: _Reader, keys: list[str], fn: Callable, shape: tuple[int, ...], dtype, sharding, stacked: bool
) -> jax.Array:
  """Builds one param (layer-stacked along axis 0 when ``stacked``) keeping only local shards.

  HF tensors are read one at a time; each device's slice is copied out of it at once, so host
  memory peaks at one HF tensor plus this host's shards of the param.
  """
  idx_map = sharding.addressable_devices_indices_map(shape)
  bufs = {dev: np.empty(_sliced_shape(shape, idx), dtype) for dev, idx in idx_map.items()}
  for layer, key in enumerate(keys):
    raw = reader.get(key)
    full = checked_weight(key, reader.path(key), raw, np.asarray(fn(raw)).astype(dtype))
    for dev, idx in idx_map.items():
      if stacked:
        start, stop, _ = idx[0].indices(shape[0])
        if start <= layer < stop:
          bufs[dev][layer - start] = full[tuple(idx[1:])]
      else:
        bufs[dev][...] = full[tuple(idx)]
    del full
  arrays = [jax.device_put(bufs[dev], dev) for dev in idx_map]
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _sliced_shape(shape, idx) -> tuple[int, ...]:
  return tuple(len(range(*s.indices(n))) for s, n in zip(idx, shape))


def load_llada_params(ckpt_dir: str, config: LLaDAConfig, shardings: Any | None = None, progress: bool = False) -> Any:
  """Reads an HF LLaDA checkpoint into our (unboxed) params pytree.

  Args:
    ckpt_dir: directory with ``model.safetensors.index.json`` + shards (or ``model.safetensors``).
    config: the preset to convert to (sizes, ``scan_layers``, ``param_dtype``).
    shardings: pytree of ``NamedSharding`` matching the params (``policy.param_shardings``); None
      places everything on the first local device.
    progress: show a tqdm bar over tensors.

  Returns:
    params pytree of ``jax.Array`` in ``config.param_dtype``.

  Raises:
    ValueError: missing, extra or mis-shaped tensors (named), unreadable shards, config mismatch.
  """
  check_hf_config(ckpt_dir, config)
  files = read_index(ckpt_dir)
  pmap = param_map(config)
  expected = {k: shape for keys, shape, _ in pmap.values() for k in keys}
  missing = sorted(set(expected) - set(files))
  if missing:
    raise ValueError(
        f"checkpoint {ckpt_dir} is missing tensor(s): {missing[:8]}"
        + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
    )
  extra = sorted(set(files) - set(expected))
  if extra:
    raise ValueError(
        f"checkpoint {ckpt_dir} has unexpected tensor(s): {extra[:8]}"
        + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else "")
    )
  flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
  dtype = np.dtype(config.param_dtype)
  out = {}
  with ExitStack() as stack:
    reader = _Reader(files, stack)
    for key, shape in expected.items():  # every header first: fail before reading any data
      got = reader.shape(key)
      if got != shape:
        raise ValueError(f"tensor {key} has shape {got}, the preset expects {shape}")
    bar = None
    if progress:
      from tqdm import tqdm

      bar = tqdm(total=len(expected), desc="convert", unit="tensor")
    for path, (keys, hf_shape, fn) in pmap.items():
      one = fn(np.empty(hf_shape, np.bool_)).shape  # target shape (np.empty: pages never touched)
      stacked = path[0] == "blocks"
      shape = (len(keys),) + one if stacked else one
      sharding = flat_shardings.get(path) or SingleDeviceSharding(jax.local_devices()[0])
      out[path] = _place(reader, keys, fn, shape, dtype, sharding, stacked)
      if bar is not None:
        bar.update(len(keys))
    if bar is not None:
      bar.close()
  return traverse_util.unflatten_dict(out)


def save_params(params: Any, out_dir: str) -> None:
  """Writes the params pytree as an Orbax ``StandardSave`` checkpoint at ``out_dir`` (must not exist).

  Restore with ``restore_params(out_dir, abstract)``, ``abstract`` from ``policy.abstract_params``.
  """
  import orbax.checkpoint as ocp

  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
    ckptr.save(paths.resolve(out_dir), args=ocp.args.StandardSave(params))  # a gs:// URL stays one


def restore_params(ckpt_dir: str, abstract: Any) -> Any:
  """Restores a ``save_params`` checkpoint into the shapes/dtypes/shardings of ``abstract``."""
  import orbax.checkpoint as ocp

  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
    return ckptr.restore(paths.resolve(ckpt_dir), args=ocp.args.StandardRestore(abstract))


def convert_checkpoint(ckpt_dir: str, out_dir: str, config: LLaDAConfig, mesh=None, progress: bool = False) -> Any:
  """HF checkpoint dir -> Orbax params checkpoint at ``out_dir``; returns the params.

  With ``mesh`` each tensor goes straight into its sharding (``parallel.LOGICAL_RULES``).
  """
  shardings = None
  if mesh is not None:
    from flax import linen as nn
    from htgrpo_jax import parallel
    from htgrpo_jax.models.llada import LLaDA
    import jax.numpy as jnp

    boxed = jax.eval_shape(lambda k: LLaDA(config).init(k, jnp.zeros((1, 4), jnp.int32))["params"], jax.random.key(0))
    shardings = parallel.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
  params = load_llada_params(ckpt_dir, config, shardings, progress=progress)
  save_params(params, out_dir)
  return params


# ------------------------------------------------------------------------------------------------
# The way back: params -> HF safetensors in the checkpoint's own key layout (``launch/export.py``).

# Params stored transposed (torch Linear [out, in] -> our [in, ...out]); the others are as is.
_TRANSPOSED = {"q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out", "lm_head"}


def to_hf(path: tuple[str, ...], ours: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
  """The HF tensor of our param ``path`` (one layer's slice): the inverse of ``param_map``'s
  transform (``w.T.reshape(ours)`` undone as ``ours.reshape(hf_shape[::-1]).T``)."""
  if path[-1] in _TRANSPOSED:
    return np.ascontiguousarray(ours.reshape(hf_shape[::-1]).T)
  return ours.reshape(hf_shape)


def save_hf(
    params: Any,
    config: LLaDAConfig,
    out_dir: str,
    *,
    dtype: Any = None,
    max_shard_bytes: int = 5 * 2**30,
    fetch: Callable[[Any], np.ndarray] | None = None,
) -> list[str]:
  """Writes ``params`` as an HF LLaDA checkpoint: ``model-0000i-of-0000n.safetensors`` shards of at
  most ``max_shard_bytes`` and ``model.safetensors.index.json``, keys and shapes as ``param_map``
  reads them (``load_llada_params(out_dir, config)`` gives ``params`` back, cast to ``dtype``).

  Args:
    params: our params pytree (the layout of ``config``).
    dtype: the tensors' dtype (default ``config.param_dtype``; the 8B checkpoints ship bfloat16).
    fetch: ``param -> np.ndarray`` on the host (default ``np.asarray``; multi-host: an all-gather).

  Returns:
    the shard file names. Only call it on one process.
  """
  fetch = fetch or np.asarray
  dtype = np.dtype(dtype or config.param_dtype)
  flat = traverse_util.flatten_dict(params)
  pmap = param_map(config)
  # Plan the shards from the shapes first, so each one is written (and freed) as soon as it is full.
  plan, size = [[]], 0
  for keys, hf_shape, _ in pmap.values():
    nbytes = math.prod(hf_shape) * dtype.itemsize
    for key in keys:
      if size and size + nbytes > max_shard_bytes:
        plan.append([])
        size = 0
      plan[-1].append(key)
      size += nbytes
  names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
  shard_of = {key: i for i, keys in enumerate(plan) for key in keys}
  os.makedirs(out_dir, exist_ok=True)
  pending: dict[int, dict[str, np.ndarray]] = {}
  total = 0
  for path, (keys, hf_shape, _) in pmap.items():
    whole = fetch(flat[path])
    for layer, key in enumerate(keys):
      ours = whole[layer] if path[0] == "blocks" else whole
      i = shard_of[key]
      pending.setdefault(i, {})[key] = t = to_hf(path, np.asarray(ours), hf_shape).astype(dtype)
      total += t.nbytes
      if len(pending[i]) == len(plan[i]):
        write_safetensors(os.path.join(out_dir, names[i]), pending.pop(i), {"format": "pt"})
    del whole
  with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
    json.dump(
        {"metadata": {"total_size": total}, "weight_map": {key: names[i] for key, i in shard_of.items()}}, f, indent=2
    )
  return names
