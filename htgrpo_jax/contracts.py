"""The package's lowest layer: the types every other part agrees on, and nothing else.

This module imports nothing from ``htgrpo_jax`` (only jax, numpy, chex, flax.struct and the standard
library), so ``data/``, ``models/``, ``sampling/``, ``rewards/``, ``pretrain.py`` and the algorithm
package ``rl/`` can all depend on it without depending on each other.

* ``MASK``: the canvas convention. An image canvas is ``int32[B, N]`` holding codebook indices in
  ``[0, C)`` at committed slots and ``MASK = -1`` at masked slots. The model side turns (prompt
  tokens, canvas) into its own token sequence through a ``Layout`` (``models/layouts.py``).
* ``CanvasLogitsFn``: the policy as the algorithm and the samplers see it; ``CachedLogits``: the
  same policy split into a full and a partial forward, for the samplers' rollout cache.
* ``Rollout``: one batch of sampled images with their trajectory record and rewards; the samplers
  fill it, the rewards complete it, the RL update consumes it.
* ``RewardFn``: the host-side reward protocol.
* ``DecodeFn``: the VQ decoder protocol (codes -> pixels, on device).
* ``EvalPrompt``: one held-out evaluation prompt.
* ``TrainState``: the learner state of both the RL update and base-policy pretraining.
* ``mask_canvas`` / ``mask_random_slots`` / ``masked_token_nll``: the masked-diffusion objective's
  masking and loss (MaskGIT / LLaDA), shared by pretraining and the RL update's supervised term
  (``HTGRPOConfig.ptx_coef``), which may not import each other.
* ``Registry``: a name -> member table for the variants a config string selects (estimators,
  partition modes, sampler rules, mask schedules, layouts, VQ decoders, worlds). It lives here, not
  in a module of its own, because ``rl/`` and ``sampling/`` may import only the contracts.

``htgrpo_jax.rl`` (``rl.MASK``, ``rl.Rollout``, ``rl.TrainState``, ...), ``rewards.RewardFn`` and
``evaluate.EvalPrompt`` re-export these names, so either spelling names the same object.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Generic, Iterator, Protocol, Sequence, TypeVar

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

__all__ = [
    "MASK",
    "CachedLogits",
    "CanvasLogitsFn",
    "DecodeFn",
    "EvalPrompt",
    "Registry",
    "Rollout",
    "RewardFn",
    "TrainState",
    "make_optimizer",
]

MASK = -1  # masked slot in an image canvas (codes are >= 0)


class CanvasLogitsFn(Protocol):
  """The policy as the algorithm sees it: logits of the N image slots over the C codebook entries.

  ``canvas_logits_fn(params, prompt_tokens, canvas) -> logits``

  Args:
    params: the policy parameters (any pytree the function takes).
    prompt_tokens: int32[B, Lp] the prompt part of the model's sequence (a ``Layout`` encodes it).
    canvas: int32[B, N] codes in [0, C) where revealed, ``MASK`` (-1) where masked.

  Returns:
    float32[B, N, C] logits (a lower-precision float is accepted; every consumer upcasts). Rows must
    be independent of each other: the samplers reorder and interleave them for guidance.
  """

  def __call__(self, params: chex.ArrayTree, prompt_tokens: jax.Array, canvas: jax.Array) -> jax.Array:
    ...


@dataclasses.dataclass(frozen=True)
class CachedLogits:
  """A policy's forward split in two, for the samplers' rollout cache (``SamplerConfig.cache``).

  ``full`` runs every sequence position and returns what a cached step needs (all positions'
  codebook logits, and the model's per-layer keys and values as an opaque pytree); ``partial``
  runs only the given positions against it. The sampler owns the refresh schedule, the choice of
  positions and the logit cache; the policy owns the keys and values
  (``models.policy.make_cached_logits`` builds one for the LLaDA models). Rows are independent,
  as for a ``CanvasLogitsFn`` (the CFG batch interleaves cond and uncond).

  Attributes:
    seq_len: L, positions per sequence.
    image_positions: int[N], the sequence positions of the N canvas slots (row-major).
    full: ``(params, prompt_tokens int32[R, Lp], canvas int32[R, N]) -> (float32[R, L, C], kv)``:
      the codebook logits of every position and the keys/values pytree of the whole sequence.
    partial: ``(params, prompt_tokens, canvas, positions int32[R, P], kv) -> (float32[R, P, C], kv)``:
      the logits at ``positions`` (distinct per row) computed from their current tokens against
      ``kv``, which is returned with those positions' keys and values replaced.
    selectable: ``prompt_tokens int32[R, Lp] -> bool[R, L]``: positions worth recomputing (False
      on pads, whose keys are masked out and whose outputs nobody reads).
  """

  seq_len: int
  image_positions: np.ndarray
  full: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]
  partial: Callable[[Any, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
  selectable: Callable[[jax.Array], jax.Array]


class DecodeFn(Protocol):
  """A VQ decoder: ``decode(decode_params, codes) -> pixels``, pure and jittable (runs on device).

  Args:
    decode_params: the decoder's params pytree (an argument, not a closure, so large decoder
      weights are not baked into a compiled program as constants).
    codes: int32[B, N] codes in [0, C), row-major over the layout's code grid.

  Returns:
    uint8[B, H, W, 3] images.
  """

  def __call__(self, decode_params: Any, codes: jax.Array) -> jax.Array:
    ...


class RewardFn(Protocol):
  """A reward: ``reward(prompts, images, **columns) -> scores``, host-side numpy, never jitted.

  Args:
    prompts: list[str] of length B, one caption per image.
    images: uint8[B, H, W, 3].
    **columns: per-prompt metadata lists of length B (e.g. ``meta=[json, ...]``); a reward ignores
      the keys it does not know.

  Returns:
    float[B] finite scores (``rewards.validate_rewards`` checks count, dtype and finiteness).
  """

  def __call__(self, prompts: Sequence[str], images: np.ndarray, **metadata: Any) -> np.ndarray:
    ...


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
  """A held-out prompt: its caption, GenEval tag and metadata (JSON string) for the scorer."""

  text: str
  tag: str
  meta: str


@struct.dataclass
class Rollout:
  """One rollout batch. Leading dim B = prompts x G with each prompt's G images contiguous; with
  ``HTGRPOConfig.num_sketches`` M >= 2 a group is M sketches x G / M paints, each sketch's paints
  contiguous (rows ordered prompt, sketch, paint).

  Attributes:
    prompt_tokens: int32[B, Lp] conditional prompt tokens (the layout's prompt part).
    image_tokens: int32[B, N] sampled codes in [0, C).
    commit_step: int32[B, N] sampler step (0-based, < T) at which each token was fixed.
    commit_entropy: float32[B, N] entropy (nats) of the distribution the token was drawn from.
    commit_logp: float32[B, N] log-prob of the drawn token under that distribution.
    rewards: float32[B] scalar reward per image.
  """

  prompt_tokens: jax.Array
  image_tokens: jax.Array
  commit_step: jax.Array
  commit_entropy: jax.Array
  commit_logp: jax.Array
  rewards: jax.Array

  @property
  def batch_size(self) -> int:
    return self.image_tokens.shape[0]

  @property
  def num_image_tokens(self) -> int:
    return self.image_tokens.shape[1]

  def validate(self) -> None:
    """Host-side shape/dtype checks; raises ValueError naming the field at fault."""
    b, n = self.image_tokens.shape
    expect = {
        "prompt_tokens": (jnp.int32, (b, None)),
        "image_tokens": (jnp.int32, (b, n)),
        "commit_step": (jnp.int32, (b, n)),
        "commit_entropy": (jnp.float32, (b, n)),
        "commit_logp": (jnp.float32, (b, n)),
        "rewards": (jnp.float32, (b,)),
    }
    for name, (dtype, shape) in expect.items():
      x = getattr(self, name)
      if x.dtype != dtype:
        raise ValueError(f"Rollout.{name}: dtype {x.dtype}, expected {jnp.dtype(dtype).name}")
      if len(x.shape) != len(shape) or any(s is not None and s != t for s, t in zip(shape, x.shape)):
        raise ValueError(
            f"Rollout.{name}: shape {tuple(x.shape)}, expected " f"{tuple('?' if s is None else s for s in shape)}"
        )


@struct.dataclass
class TrainState:
  """Learner state (a pytree; donated to the step) of the RL update and of pretraining.

  The field order and names are the layout of the RL checkpoints (``checkpoint.RunCheckpointer``
  saves this pytree); do not reorder them.

  Attributes:
    step: int32[] number of completed steps (RL: rollout batches; pretraining: batches).
    params: policy parameters (any pytree the canvas_logits_fn takes).
    opt_state: the optax state of ``params``.
    ref_params: frozen reference policy (same structure as params), or None: the RL update without
      a KL term (beta == 0), pretraining and adapter training (whose reference is ``frozen`` with
      the adapters off) keep none.
    skipped: int32[] updates skipped so far because of a non-finite loss, gradient or update.
    frozen: the frozen base of adapter training (LoRA), or None (full fine-tuning). Then ``params``
      are the adapters only, the policy's params are ``Adapted(frozen, params)`` and the
      reference is ``Adapted(frozen, None)``. Held here once, never written to a run checkpoint
      (``without_frozen``; the base is reloaded from its own checkpoint on resume).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  ref_params: Any
  skipped: jax.Array
  frozen: Any = None

  @classmethod
  def create(
      cls,
      params: Any,
      optimizer: optax.GradientTransformation,
      *,
      ref_params: Any = None,
      with_reference: bool = True,
      frozen: Any = None,
  ) -> "TrainState":
    """Fresh state; the reference defaults to a copy of ``params`` (a copy so donation cannot alias).
    With a ``frozen`` base, ``params`` are the adapters and no reference copy is kept."""
    if frozen is not None:
      with_reference = False
    if with_reference and ref_params is None:
      ref_params = jax.tree.map(jnp.copy, params)
    return cls(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ref_params=ref_params if with_reference else None,
        skipped=jnp.zeros((), jnp.int32),
        frozen=frozen,
    )

  def policy_params(self, rng: jax.Array | None = None) -> Any:
    """What the ``CanvasLogitsFn`` takes: ``params``, or ``Adapted(frozen, params, rng)``."""
    return policy_params(self.frozen, self.params, rng)

  def reference_params(self) -> Any:
    """The KL reference: ``ref_params``, or the frozen base with the adapters off."""
    return self.ref_params if self.frozen is None else Adapted(self.frozen, None)

  def without_frozen(self) -> "TrainState":
    """The state as a run checkpoint holds it (the frozen base left out)."""
    return self.replace(frozen=None)


@struct.dataclass
class Adapted:
  """Params of a policy made of a frozen base and trainable adapters (LoRA); a pytree.

  Attributes:
    base: the frozen base params.
    adapters: the adapter params, or None: adapters off (the base policy, the KL reference).
    rng: the adapters' dropout key (a gradient pass), or None: deterministic (rollouts, the old
      and reference passes, evaluation).
  """

  base: Any
  adapters: Any = None
  rng: Any = None


def policy_params(frozen: Any, params: Any, rng: jax.Array | None = None) -> Any:
  """``params`` when there is no frozen base, else ``Adapted(frozen, params, rng)``."""
  return params if frozen is None else Adapted(frozen, params, rng)


def make_optimizer(
    learning_rate: float | optax.Schedule,
    *,
    clip_norm: float | None = 1.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
  """The one optimizer every ``TrainState`` is built with (RL, pretraining, AOT): global-norm
  clipping (when ``clip_norm``) then AdamW. A schedule counts optimizer updates (RL: inner ones)."""
  adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  return optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm else adamw


_T = TypeVar("_T")


class Registry(Generic[_T]):
  """Named variants selected by a config string (Tunix's ``function_registry`` in miniature).

  Each family owns one registry, and each member registers itself where it is defined::

    ESTIMATORS = Registry("HTGRPOConfig.estimator")

    @ESTIMATORS.register("htgrpo")
    def htgrpo_canvas(...): ...

    ESTIMATORS.get(config.estimator)  # the member; an unknown name raises naming key and choices

  Names keep their registration order (``names()``), so error messages and enumerations are
  stable. Registering a name twice is an error (two modules claiming one config value).

  Args:
    key: the config key whose value selects a member, as errors name it (``'model.layout'``).
  """

  def __init__(self, key: str):
    self.key = key
    self._members: dict[str, _T] = {}

  def register(self, name: str) -> Callable[[_T], _T]:
    """Decorator: ``@registry.register('name')`` adds the decorated object and returns it as is."""
    if not isinstance(name, str) or not name:
      raise ValueError(f"{self.key}: a registered name must be a non-empty string, got {name!r}")

    def add(member: _T) -> _T:
      if name in self._members:
        raise ValueError(f"{self.key}={name!r} is already registered ({self._members[name]!r})")
      self._members[name] = member
      return member

    return add

  def get(self, name: str) -> _T:
    """The member called ``name``.

    Raises:
      ValueError: ``"<key>=<name> must be one of (<names>)"`` for an unknown name.
    """
    try:
      return self._members[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value from a config
      raise ValueError(f"{self.key}={name!r} must be one of {self.names()}") from None

  def names(self) -> tuple[str, ...]:
    """Registered names, in registration order."""
    return tuple(self._members)

  def __contains__(self, name: object) -> bool:
    try:
      return name in self._members
    except TypeError:
      return False

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self._members)

  def __repr__(self) -> str:
    return f"Registry({self.key!r}, names={self.names()})"


# ---- the masked-diffusion objective (pretraining and the RL update's supervised term) ----


def mask_random_slots(codes: jax.Array, key: jax.Array, num: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Masks ``num`` (int/float[B, 1] or scalar) slots per row, chosen uniformly at random by ``key``;
  returns (canvas int32[B, N], masked bool[B, N])."""
  b, n = codes.shape
  # Rank of each slot in a random order: the ``num`` lowest-ranked slots are masked.
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(key, (b, n)), axis=1), axis=1)
  masked = rank < num
  return jnp.where(masked, MASK, codes), masked


def mask_canvas(codes: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Masks ceil(t * N) random slots per row, t ~ U(0, 1] per row.

  Args:
    codes: int32[B, N] clean codes.
    key: PRNG key.

  Returns:
    (canvas int32[B, N] with MASK at masked slots, masked bool[B, N]); every row masks >= 1 slot.
  """
  b, n = codes.shape
  k_t, k_order = jax.random.split(key)
  t = 1.0 - jax.random.uniform(k_t, (b, 1))  # (0, 1]
  return mask_random_slots(codes, k_order, jnp.clip(jnp.ceil(t * n), 1, n))


def masked_token_nll(logits: jax.Array, codes: jax.Array, masked: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy of the true codes at the masked slots.

  Args:
    logits: float[B, N, C]; codes: int32[B, N]; masked: bool[B, N].

  Returns:
    (summed loss float32[], number of masked slots float32[]).
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), codes)
  w = masked.astype(jnp.float32)
  return jnp.sum(ce * w), jnp.sum(w)
