"""LoRA adapters on the LLaDA backbone's projections (PEFT's maths, our own Linen; no qwix).

A targeted projection ``y = x W`` (W: ``in_shape + feats``) becomes

  y = x W + (alpha / rank) * dropout(x) A B        A: in_shape + (rank,), B: (rank,) + feats

with A drawn like PEFT's default (kaiming-uniform, bound 1 / sqrt(fan_in)) and B zero, so a fresh
adapter leaves the model exactly as it was. A's input dims shard like the kernel's (``embed`` ->
fsdp); B's rank dim (logical ``lora_rank``) shards over fsdp and its output dims like the kernel's,
so the rank must divide by the mesh's fsdp size (checked, by name, in ``policy.adapter_shardings``).
The adapters live in their own Linen collection,
``'lora'`` (``{'blocks': {'q_proj_a': ..., 'q_proj_b': ...}}`` with a leading ``layers`` axis under
``scan_layers``), next to ``'params'``: applying the model without it is the base model (the KL
reference, one forward and no second copy of the weights), and the trainable state holds the
adapters and nothing else. Dropout runs only when the apply has a ``'dropout'`` rng (the gradient
pass of the update); rollouts, the old-policy and reference passes and evaluation pass none.

Why not qwix's ``LoraProvider``: its rules select by *module path*, and LLaDA's seven projections are
params of one ``Block`` module (the param layout the converters and ``nn.scan`` rely on), so q/k/v
and the MLP up projection cannot be targeted without splitting the block into per-projection
submodules (new param paths everywhere); its LoRA params share the ``params`` collection with the
base, so adapters-off needs a second wrapped model; and its dropout is always on when the rate is
positive (``deterministic=False``), so the rollout and reference passes would need a third.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

COLLECTION = "lora"
RNG = "lora"  # the stream adapters are initialised from (never 'params': the base init is unchanged)
# The projections of a LLaDA block, by their parameter names.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA settings (``model.lora`` in a training config).

  Attributes:
    rank: r, the adapters' inner width (> 0; a config with rank 0 or None has no LoRA).
    alpha: the update is scaled by ``alpha / rank`` (PEFT's scaling).
    dropout: dropout rate on the adapters' input in gradient passes, in [0, 1).
    targets: regex, fully matched against the projection names (``PROJECTIONS``).
  """

  rank: int
  alpha: float
  dropout: float = 0.0
  targets: str = "q_proj|k_proj|v_proj|up_proj"

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank <= 0:
      raise ValueError(f"model.lora.rank={self.rank!r}: must be an int > 0 (0 or None: no LoRA)")
    if (
        isinstance(self.alpha, bool)
        or not isinstance(self.alpha, (int, float))
        or not np.isfinite(self.alpha)
        or self.alpha <= 0
    ):
      raise ValueError(f"model.lora.alpha={self.alpha!r}: must be a finite number > 0")
    if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
      raise ValueError(f"model.lora.dropout={self.dropout!r}: must be a number in [0, 1)")
    try:
      pattern = re.compile(self.targets)
    except (re.error, TypeError) as e:
      raise ValueError(f"model.lora.targets={self.targets!r}: not a regex ({e})") from None
    if not any(pattern.fullmatch(n) for n in PROJECTIONS):
      raise ValueError(f"model.lora.targets={self.targets!r} matches none of the projections " f"{PROJECTIONS}")
    object.__setattr__(self, "rank", int(self.rank))
    object.__setattr__(self, "alpha", float(self.alpha))
    object.__setattr__(self, "dropout", float(self.dropout))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def targeted(self, name: str) -> bool:
    return re.fullmatch(self.targets, name) is not None


LORA_KEYS = ("rank", "alpha", "dropout", "targets")


def from_config(model: Mapping[str, Any]) -> LoraConfig | None:
  """``model.lora`` of a training config as a ``LoraConfig``; None when absent or rank is 0/None.

  Raises:
    ValueError: an unknown ``model.lora`` key or a bad value, naming it.
  """
  lora = model.get("lora") if hasattr(model, "get") else None
  if lora is None:
    return None
  lora = dict(lora)
  unknown = sorted(set(lora) - set(LORA_KEYS))
  if unknown:
    raise ValueError(f"model.lora.{unknown[0]}: not a LoRA setting (known: {', '.join(LORA_KEYS)})")
  if not lora.get("rank"):
    return None
  return LoraConfig(**{k: v for k, v in lora.items() if v is not None})


def attach(model_cfg: Any, model: Mapping[str, Any]) -> Any:
  """``model_cfg`` (an ``LLaDAConfig``) with the adapters of ``model.lora`` (unchanged when off)."""
  lora = from_config(model)
  return model_cfg if lora is None else dataclasses.replace(model_cfg, lora=lora)


def _specs(spec: str, n_in: int) -> tuple[str, str]:
  """The einsums of ``x A`` and ``(x A) B`` of a projection einsum ``spec`` ('bld,dhk->blhk')
  whose kernel's first ``n_in`` dims contract with x."""
  lhs, rest = spec.split(",")
  rhs, out = rest.split("->")
  contracted = rhs[:n_in]
  r = next(ch for ch in "rstuvwxyz" if ch not in spec)
  kept = "".join(ch for ch in lhs if ch not in contracted)
  return f"{lhs},{contracted}{r}->{kept}{r}", f"{kept}{r},{r}{rhs[n_in:]}->{out}"


def delta(
    module: nn.Module,
    lora: LoraConfig | None,
    name: str,
    x: jax.Array,
    spec: str,
    in_shape: tuple[int, ...],
    feats: tuple[int, ...],
    names: Sequence[str | None],
    dtype: Any,
    param_dtype: Any,
) -> jax.Array | None:
  """The LoRA term of projection ``name`` inside ``module``, or None: not targeted, or the apply
  has no ``'lora'`` collection (adapters off) and is not creating one.

  Args:
    module: the Linen module that owns the projection's kernel (its adapters sit beside it).
    x: the projection's input, [..., *in_shape] in the compute dtype.
    spec: the projection's einsum (x, kernel -> y); ``names``: the kernel's logical axes.
    in_shape, feats: the kernel's contracted and output dims.

  Returns:
    (alpha / rank) * dropout(x) A B in ``dtype``, shaped like the projection's output.
  """
  if lora is None or not lora.targeted(name):
    return None
  a_name, b_name = f"{name}_a", f"{name}_b"
  creating = module.is_mutable_collection(COLLECTION) and module.has_rng(RNG)
  if not (creating or module.has_variable(COLLECTION, a_name)):
    return None
  n_in = len(in_shape)
  a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1)
  boxed = lambda init, axes: lambda shape: nn.with_logical_partitioning(init, axes)(
      module.make_rng(RNG), shape, param_dtype
  )
  a = module.variable(COLLECTION, a_name, boxed(a_init, tuple(names[:n_in]) + (None,)), in_shape + (lora.rank,)).value
  b = module.variable(
      COLLECTION, b_name, boxed(nn.initializers.zeros, ("lora_rank",) + tuple(names[n_in:])), (lora.rank,) + feats
  ).value
  if lora.dropout and module.has_rng("dropout"):
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)
  a_spec, b_spec = _specs(spec, n_in)
  h = jnp.einsum(a_spec, x, a.astype(dtype))
  return jnp.einsum(b_spec, h, b.astype(dtype)) * jnp.asarray(lora.scale, dtype)


def merge(lora: LoraConfig, base: Any, adapters: Any) -> Any:
  """The base params with every adapter folded in: W + (alpha / rank) A B, in W's dtype (fp32 sums).

  Works on the scanned (leading ``layers`` axis) and unscanned layouts alike: ``adapters`` mirror
  the base tree, each block's ``{name}_a`` / ``{name}_b`` beside its kernel ``name``.
  """

  def fold(base_node, lora_node):
    out = dict(base_node)
    for key, sub in lora_node.items():
      if isinstance(sub, Mapping):
        out[key] = fold(base_node[key], sub)
      elif key.endswith("_a"):
        name = key[:-2]
        w, a, b = base_node[name], lora_node[key], lora_node[f"{name}_b"]
        # w: lead + in + out, a: lead + in + (r,), b: lead + (r,) + out (lead: the scanned layers)
        lead = a.ndim + b.ndim - 2 - w.ndim
        a2 = jnp.asarray(a, jnp.float32).reshape(a.shape[:lead] + (-1, lora.rank))
        b2 = jnp.asarray(b, jnp.float32).reshape(b.shape[:lead] + (lora.rank, -1))
        d = jnp.einsum("...ir,...ro->...io", a2, b2, precision=jax.lax.Precision.HIGHEST)
        out[name] = (jnp.asarray(w, jnp.float32) + lora.scale * d.reshape(w.shape)).astype(w.dtype)
    return out

  return fold(base, adapters)
