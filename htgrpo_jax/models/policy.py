"""The policy as the algorithm sees it: a LLaDA backbone + a layout -> codebook logits at the slots.

``make_logits_fn`` implements the model contract of docs/architecture.md
``logits_fn(params, tokens int32[B, L]) -> float32[B, N, C]`` (image slots only, LM head sliced to
the codebook rows before the matmul); ``make_canvas_logits_fn`` composes it with the layout into the
``CanvasLogitsFn`` of contracts.py. Params are the plain (unboxed) ``params`` collection; their
shardings come from the modules' logical axis names through ``parallel.LOGICAL_RULES``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, PartitionSpec as P

from htgrpo_jax import parallel
from htgrpo_jax.contracts import Adapted, CachedLogits, CanvasLogitsFn
from htgrpo_jax.models import lora as lora_lib
from htgrpo_jax.models.layouts import Layout
from htgrpo_jax.models.llada import KVCache, LLaDA, LLaDAConfig

LogitsFn = Callable[[Any, jax.Array], jax.Array]


def check_compatible(config: LLaDAConfig, layout: Layout) -> None:
  """Raises ValueError when the model cannot serve the layout (vocab, pad mask, position table)."""
  if config.vocab_size < layout.vocab_size:
    raise ValueError(f"model vocab_size={config.vocab_size} < layout vocab_size={layout.vocab_size}")
  if layout.pad_id is not None and not config.use_pad_mask:
    raise ValueError(f"layout pads prompts with id {layout.pad_id} but the model has use_pad_mask=False")
  if config.use_pad_mask and config.pad_id != layout.pad_id:
    raise ValueError(f"model pad_id={config.pad_id} != layout pad_id={layout.pad_id}")
  if config.learned_pos_emb and config.learned_pos_emb < layout.seq_len:
    raise ValueError(f"model learned_pos_emb={config.learned_pos_emb} < layout seq_len={layout.seq_len}")


def _run_auto(fn: Callable, params: Any, *args: jax.Array, out: Any = None) -> Any:
  """Calls ``fn(params, *args)`` under the logical rules, in GSPMD (Auto) mode.

  Under an Explicit-axes mesh (``jax.set_mesh(parallel.make_mesh(...))``, or inputs typed with
  one) the model runs inside ``jax.sharding.auto_axes``: Linen logical constraints and the
  embedding gather / layout scatter are GSPMD annotations and ops (MaxText's mode). ``out``: the
  output's ``PartitionSpec`` pytree there (default: one [B, N, C] logits array, batch-sharded).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:  # no jax.set_mesh: take the mesh the params are typed with, if any
    leaf = jax.tree.leaves(params.base if isinstance(params, Adapted) else params)[0]
    mesh = getattr(jax.typeof(leaf).sharding, "mesh", mesh)
  with nn.logical_axis_rules(parallel.LOGICAL_RULES), jax.sharding.use_abstract_mesh(mesh):
    if not mesh.empty and mesh.explicit_axes:
      # Codebook replicated: consumers (log-softmax, gathers of chosen codes) then need no
      # explicit-sharding annotations; the [B, N, C] logits are small next to the weights.
      out = P(parallel.BATCH_AXES, None, None) if out is None else out
      return jax.sharding.auto_axes(fn, axes=mesh.explicit_axes, out_sharding=out)(params, *args)
    return fn(params, *args)


def make_logits_fn(config: LLaDAConfig, layout: Layout) -> LogitsFn:
  """Returns ``logits_fn(params, tokens int32[B, L]) -> float32[B, N, C]`` (pure, jit-able).

  Raises:
    ValueError: the model does not fit the layout; at trace time, tokens of the wrong length.
  """
  check_compatible(config, layout)
  model = LLaDA(config)
  select = np.asarray(layout.image_positions)
  head_rows = (layout.image_offset, layout.codebook_size)

  def apply(p, t):
    if not isinstance(p, Adapted):
      return model.apply({"params": p}, t, select=select, head_rows=head_rows)
    # LoRA: adapters None = the base policy; a dropout rng only in the update's gradient passes.
    variables = {"params": p.base}
    if p.adapters is not None:
      variables[lora_lib.COLLECTION] = p.adapters
    rngs = None if p.rng is None or p.adapters is None else {"dropout": p.rng}
    return model.apply(variables, t, select=select, head_rows=head_rows, rngs=rngs)

  def logits_fn(params, tokens):
    if tokens.ndim != 2 or tokens.shape[1] != layout.seq_len:
      raise ValueError(f"logits_fn tokens shape {tokens.shape}, expected [B, {layout.seq_len}]")
    return _run_auto(apply, params, tokens)

  return logits_fn


def make_canvas_logits_fn(config: LLaDAConfig, layout: Layout) -> CanvasLogitsFn:
  """``(params, prompt_tokens int32[B, Lp], canvas int32[B, N]) -> float32[B, N, C]``."""
  logits_fn = make_logits_fn(config, layout)
  # assemble runs inside the same Auto region (its scatter needs GSPMD under Explicit meshes).
  fn = lambda p, prompt, canvas: logits_fn(p, layout.assemble(prompt, canvas))
  return lambda params, prompt_tokens, canvas: _run_auto(fn, params, prompt_tokens, canvas)


def make_cached_logits(config: LLaDAConfig, layout: Layout) -> CachedLogits:
  """The policy's full and partial forwards for the samplers' rollout cache (``contracts.CachedLogits``).

  ``full`` returns the codebook logits of all L positions (LM head sliced to the codebook, as
  ``make_logits_fn``) and the ``llada.KVCache``; ``partial`` runs the tokens at the given positions
  against that cache (``LLaDA(positions=, kv_cache=)``). Same params, adapters and dtypes as
  ``make_canvas_logits_fn``: at positions whose cache is fresh both give the same logits.
  """
  check_compatible(config, layout)
  model = LLaDA(config)
  head_rows = (layout.image_offset, layout.codebook_size)

  def apply(p, tokens, **kw):
    if not isinstance(p, Adapted):
      return model.apply({"params": p}, tokens, head_rows=head_rows, **kw)
    variables = {"params": p.base}
    if p.adapters is not None:
      variables[lora_lib.COLLECTION] = p.adapters
    return model.apply(variables, tokens, head_rows=head_rows, **kw)  # sampling: no dropout rng

  batch = P(parallel.BATCH_AXES, None, None)
  kv_spec = KVCache(*[P(None, parallel.BATCH_AXES, None, None, None)] * 2)

  def full(params, prompt, canvas):
    fn = lambda p, pr, cv: apply(p, layout.assemble(pr, cv), return_kv=True)
    return _run_auto(fn, params, prompt, canvas, out=(batch, kv_spec))

  def partial(params, prompt, canvas, positions, kv):
    fn = lambda p, pr, cv, pos, c: apply(p, layout.assemble(pr, cv), positions=pos, kv_cache=KVCache(*c))
    return _run_auto(fn, params, prompt, canvas, positions.astype(jnp.int32), kv, out=(batch, kv_spec))

  def selectable(prompt):
    rows = jnp.ones((prompt.shape[0], layout.seq_len), bool)
    if layout.pad_id is None:
      return rows
    pad = jnp.zeros(rows.shape, bool).at[:, : layout.prompt_length].set(prompt == layout.pad_id)
    return rows & ~pad

  return CachedLogits(
      seq_len=layout.seq_len,
      image_positions=np.asarray(layout.image_positions),
      full=full,
      partial=partial,
      selectable=selectable,
  )


def _boxed_init(config: LLaDAConfig, layout: Layout) -> Callable[[jax.Array], Any]:
  check_compatible(config, layout)
  model = LLaDA(config)
  # Parameter shapes do not depend on the sequence length; a short dummy keeps init cheap.
  dummy = jnp.zeros((1, min(layout.seq_len, 8)), jnp.int32)
  return lambda key: model.init(key, dummy)["params"]


def param_logical_specs(config: LLaDAConfig, layout: Layout) -> Any:
  """Pytree of logical ``PartitionSpec``s matching the params (no allocation)."""
  boxed = jax.eval_shape(_boxed_init(config, layout), jax.random.key(0))
  return nn.get_partition_spec(boxed)


def _abstract(boxed_init: Any, shardings: Any) -> Any:
  """The ``jax.ShapeDtypeStruct`` tree of ``boxed_init(key)``, with ``shardings()`` attached when given."""
  shapes = nn.meta.unbox(jax.eval_shape(boxed_init, jax.random.key(0)))
  if not shardings:
    return shapes
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings())


def abstract_params(config: LLaDAConfig, layout: Layout, mesh: Mesh | None = None) -> Any:
  """``jax.ShapeDtypeStruct`` params (with shardings when ``mesh`` is given); nothing allocated."""
  return _abstract(_boxed_init(config, layout), mesh and (lambda: param_shardings(config, layout, mesh)))


def param_shardings(config: LLaDAConfig, layout: Layout, mesh: Mesh) -> Any:
  """Pytree of ``NamedSharding`` for the params on ``mesh``.

  Raises:
    ValueError: a parameter dimension does not divide by its mesh axes (names the param; round
      e.g. ``vocab_size`` up to a multiple of the ``tensor`` size).
  """
  return _checked_shardings(jax.eval_shape(_boxed_init(config, layout), jax.random.key(0)), mesh, "param")


def _checked_shardings(boxed: Any, mesh: Mesh, what: str) -> Any:
  shardings = parallel.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
  leaves = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))[0]
  for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings)):
    spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
    for dim, axes in zip(leaf.shape, spec):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      ways = int(np.prod([mesh.shape[a] for a in names]))
      if dim % ways:
        raise ValueError(
            f"{what} {jax.tree_util.keystr(path)} shape {leaf.shape}: dim {dim} does not "
            f"divide by mesh axes {names} ({ways}); round the model size up"
        )
  return shardings


def init_params(config: LLaDAConfig, layout: Layout, key: jax.Array, mesh: Mesh | None = None) -> Any:
  """Random params (unboxed pytree). With ``mesh`` they are created directly sharded by a jitted
  init whose ``out_shardings`` are the param shardings (never whole on one device)."""
  init = lambda k: nn.meta.unbox(_boxed_init(config, layout)(k))
  if mesh is None:
    return jax.jit(init)(key)
  return jax.jit(init, out_shardings=param_shardings(config, layout, mesh))(key)


# ------------------------------------------------------------------------------------------------
# LoRA adapters (``config.lora``): their own pytree, trained while the base stays frozen.


def _boxed_adapter_init(config: LLaDAConfig, layout: Layout) -> Callable[[jax.Array], Any]:
  check_compatible(config, layout)
  if config.lora is None:
    raise ValueError("model.lora is off (rank 0 or None): the model has no adapters")
  model = LLaDA(config)
  dummy = jnp.zeros((1, min(layout.seq_len, 8)), jnp.int32)
  # The base params this init also draws are dropped (dead code under jit / eval_shape).
  return lambda key: model.init({"params": key, lora_lib.RNG: key}, dummy)[lora_lib.COLLECTION]


def abstract_adapters(config: LLaDAConfig, layout: Layout, mesh: Mesh | None = None) -> Any:
  """``jax.ShapeDtypeStruct`` adapters (with shardings when ``mesh`` is given); nothing allocated."""
  return _abstract(_boxed_adapter_init(config, layout), mesh and (lambda: adapter_shardings(config, layout, mesh)))


def adapter_shardings(config: LLaDAConfig, layout: Layout, mesh: Mesh) -> Any:
  """Pytree of ``NamedSharding`` for the adapters: A like its kernel's input dims, B like its
  output dims with its rank dim (logical ``lora_rank``) over fsdp."""
  return _checked_shardings(jax.eval_shape(_boxed_adapter_init(config, layout), jax.random.key(0)), mesh, "adapter")


def init_adapters(config: LLaDAConfig, layout: Layout, key: jax.Array, mesh: Mesh | None = None) -> Any:
  """Fresh adapters (A random, B zero: the policy equals the base), created sharded with ``mesh``."""
  init = lambda k: nn.meta.unbox(_boxed_adapter_init(config, layout)(k))
  if mesh is None:
    return jax.jit(init)(key)
  return jax.jit(init, out_shardings=adapter_shardings(config, layout, mesh))(key)
