"""The bidirectional LLaDA transformer (MMaDA-8B and Lumina-DiMOO backbone) in Flax Linen.

One module serves every model family; only sizes, vocabulary and the pad-mask setting differ
(docs/models.md, the shared backbone). The maths, matching LLaDA's OLMo-derived code:

  x = wte[tokens] (+ wpe[pos] when ``learned_pos_emb``; never on the 8B presets)
  per block: h = RMSNorm(x); q, k, v = h W_q, h W_k, h W_v; RoPE(q, k) in fp32 at physical positions
             x += attn_out(softmax(q k^T / sqrt(d_head) + pad bias) v)      (bidirectional)
             x += ff_out(silu(ff_proj(RMSNorm(x))) * up_proj(RMSNorm(x)))
  logits = ln_f(x) W_head                                                     (untied, no biases)

A second, partial path serves the sampler's rollout cache (Lumina-DiMOO's ML-Cache; docs/performance.md,
"Rollout cache"): ``return_kv=True`` also returns every layer's keys (after RoPE) and values, and
``positions=`` + ``kv_cache=`` runs only the tokens at those positions, writes their fresh keys and
values into the cache and attends their queries against all L cached keys. Both paths are the same
module with the same params.

Every parameter and activation carries logical axis names (``batch, length, layers, embed, heads,
kv, mlp, vocab, codebook``) that ``htgrpo_jax.parallel.LOGICAL_RULES`` maps onto the mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from htgrpo_jax.models import lora as lora_lib

REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LLaDAConfig:
  """Sizes and numerics of a LLaDA backbone.

  Attributes:
    vocab_size: embedding / LM-head rows V.
    d_model: hidden width D (head_dim = D / n_heads).
    n_layers: number of blocks.
    n_heads: attention heads (plain MHA).
    mlp_hidden: gated-MLP hidden width.
    rope_theta: RoPE base.
    norm_eps: RMSNorm epsilon.
    dtype: compute dtype of activations and matmuls (bf16 for 8B; norms, RoPE and logits use fp32).
    param_dtype: storage dtype of parameters (fp32 master weights).
    remat: one of ``REMAT_POLICIES`` (per-block rematerialisation in the backward pass).
    scan_layers: stack blocks with ``nn.scan`` (params get a leading ``layers`` axis); keeps
      compile time flat in depth.
    use_pad_mask: mask keys equal to ``pad_id`` in attention.
    pad_id: the pad token id (required when ``use_pad_mask``).
    attention_impl: ``implementation`` of ``jax.nn.dot_product_attention`` (None = XLA's choice,
      'xla', 'cudnn').
    learned_pos_emb: size of an optional learned absolute position table added to the embeddings
      (0 = off, as in LLaDA); sequences may not be longer than the table.
    init_std: std of the normal initialiser of all matrices.
    lora: ``lora.LoraConfig`` of LoRA adapters on the targeted projections (their own ``'lora'``
      collection; applying without it is the base model), or None.
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  mlp_hidden: int
  rope_theta: float = 500000.0
  norm_eps: float = 1e-5
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  remat: str = "none"
  scan_layers: bool = False
  use_pad_mask: bool = False
  pad_id: int | None = None
  attention_impl: str | None = None
  learned_pos_emb: int = 0
  init_std: float = 0.02
  lora: lora_lib.LoraConfig | None = None

  def __post_init__(self):
    # Normalise dtypes so configs compare/hash equal however the dtype was spelled.
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden"):
      if int(getattr(self, key)) <= 0:
        raise ValueError(f"LLaDAConfig.{key} must be positive, got {getattr(self, key)}")
    if self.d_model % self.n_heads:
      raise ValueError(f"LLaDAConfig.d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
    if self.head_dim % 2:
      raise ValueError(f"LLaDAConfig: head_dim={self.head_dim} must be even for RoPE")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"LLaDAConfig.remat={self.remat!r}, expected one of {sorted(REMAT_POLICIES)}")
    if self.use_pad_mask and self.pad_id is None:
      raise ValueError("LLaDAConfig.pad_id must be set when use_pad_mask=True")
    if self.attention_impl not in (None, "xla", "cudnn"):
      raise ValueError(f"LLaDAConfig.attention_impl={self.attention_impl!r}, expected None, 'xla' or 'cudnn'")
    if self.learned_pos_emb < 0:
      raise ValueError(f"LLaDAConfig.learned_pos_emb must be >= 0, got {self.learned_pos_emb}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  def num_params(self) -> int:
    """Analytic parameter count (embedding + blocks + final norm + LM head)."""
    d, m = self.d_model, self.mlp_hidden
    block = 4 * d * d + 3 * d * m + 2 * d
    return 2 * self.vocab_size * d + self.n_layers * block + d + self.learned_pos_emb * d


_8B = dict(
    d_model=4096,
    n_layers=32,
    n_heads=32,
    mlp_hidden=12288,
    rope_theta=500000.0,
    norm_eps=1e-5,
    dtype=jnp.bfloat16,
    param_dtype=jnp.float32,
    remat="full",
    scan_layers=True,
)

PRESETS: dict[str, LLaDAConfig] = {
    # Unit tests: everything small, fp32 so parity checks are tight.
    "tiny": LLaDAConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, mlp_hidden=128, dtype=jnp.float32),
    # The embedded ShapeEval world (docs/architecture.md: d=128, 4 layers, 4 heads); vocab comes from the layout.
    # The learned table gives every image slot its own embedding, which helps a small model learn
    # the 2-D layout quickly (the prototype used row+column positions).
    "shapes": LLaDAConfig(
        vocab_size=512, d_model=128, n_layers=4, n_heads=4, mlp_hidden=512, dtype=jnp.float32, learned_pos_emb=256
    ),
    # MMaDA-8B: 126349 text ids + 8192 MAGVIT-v2 codes, padded to 134656 rows; left padding with
    # [iPAD] 126093 masked as in the reference.
    "mmada_8b": LLaDAConfig(vocab_size=134656, use_pad_mask=True, pad_id=126093, **_8B),
    # Lumina-DiMOO: 126356 text ids + 8192 codes. The reference runs unpadded B=1 sequences with no
    # mask; our DiMOO layout left-pads prompts to a fixed length with <|endoftext|> 126081 and masks
    # those keys, which is exactly equivalent (RoPE attention depends on relative positions only).
    "lumina_dimoo_8b": LLaDAConfig(vocab_size=134548, use_pad_mask=True, pad_id=126081, **_8B),
}


def get_config(name: str, **overrides) -> LLaDAConfig:
  """Returns preset ``name`` with dataclass fields replaced by ``overrides``.

  Raises:
    ValueError: unknown preset or override key.
  """
  if name not in PRESETS:
    raise ValueError(f"model preset {name!r} unknown; choose from {sorted(PRESETS)}")
  fields = {f.name for f in dataclasses.fields(LLaDAConfig)}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(f"model config override(s) {bad} are not LLaDAConfig fields")
  return dataclasses.replace(PRESETS[name], **overrides)


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos, sin: float32[length, head_dim] for positions ``arange(length)`` (half-split layout)."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  freqs = np.outer(np.arange(length, dtype=np.float64), inv_freq)
  emb = np.concatenate([freqs, freqs], axis=-1)
  # Tables are built in float64 on the host then rounded, so they are exact constants under jit.
  return jnp.asarray(np.cos(emb), jnp.float32), jnp.asarray(np.sin(emb), jnp.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x``: [B, L, H, Dh] by the [L, Dh] tables, or per-row [B, L, Dh] tables (the rows'
  own positions), in fp32 (NeoX half-split), cast back."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  cos, sin = (t[None, :, None, :] if t.ndim == 2 else t[:, :, None, :] for t in (cos, sin))
  out = xf * cos + rotated * sin
  return out.astype(x.dtype)


def flat_matmul(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  """``x [..., *in] @ kernel [*in, *out] -> [..., *out]`` as one 2-D matmul over the flattened rows.

  The same products and sums as the einsum over the named axes. Written flat because XLA:CPU lowers the
  einsum form's backward to weight-gradient dots whose activation operand (e.g. the MLP's [B*L, mlp]
  gradient) it first writes transposed in a strided fused copy; the flat form keeps every backward dot
  row-major: one fwd+bwd of the shapes-size update went from 0.55-0.78x to 1.1-1.4x eager PyTorch on
  one thread (docs/performance.md, ``bench/loss_grad.py``). Merging a sharded leading dim (batch, heads)
  with replicated minor ones keeps the shardings (tests/models/test_aot.py compiles the sharded programs).
  """
  in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
  lead = x.shape[: x.ndim - n_in]
  k_in, k_out = int(np.prod(in_shape)), int(np.prod(out_shape))
  y = jnp.dot(x.reshape((-1, k_in)), kernel.reshape((k_in, k_out)))
  return y.reshape(lead + out_shape)


def _constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  return nn.with_logical_constraint(x, tuple(axes))


class RMSNorm(nn.Module):
  """Normalises in fp32, casts to the compute dtype, then scales (LLaDA's order)."""

  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],), self.param_dtype
    )
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * scale.astype(self.dtype)


class Block(nn.Module):
  """One LLaDA-Llama block; returns ``(x, kv)`` so it can be the body of ``nn.scan``.

  ``kv`` is None, or with ``return_kv`` this layer's ``(k, v)`` [B, L, H, Dh] (k after RoPE). With
  ``kv=(k_cache, v_cache)`` and ``positions`` int32[B, P], ``x`` [B, P, D] holds only the tokens at
  ``positions`` (``cos``/``sin`` their per-row tables [B, P, Dh]): their k and v overwrite the
  cache rows at ``positions`` and their queries attend against all L cached keys; returns the
  updated cache.
  """

  config: LLaDAConfig
  return_kv: bool = False

  @nn.compact
  def __call__(self, x, mask, cos, sin, kv=None, positions=None):
    c = self.config
    init = nn.initializers.normal(c.init_std)

    def dense(x, spec, feats, names, name):
      # A plain einsum over a logically-named kernel (nn.DenseGeneral reshapes its boxed kernel to
      # 2-D, which breaks logical constraints on multi-axis kernels under a global mesh).
      in_shape = x.shape[-(len(names) - len(feats)) :]
      kernel = self.param(name, nn.with_logical_partitioning(init, names), in_shape + feats, c.param_dtype)
      y = flat_matmul(x, kernel.astype(c.dtype), len(in_shape))  # = jnp.einsum(spec, x, kernel)
      d = lora_lib.delta(self, c.lora, name, x, spec, in_shape, feats, names, c.dtype, c.param_dtype)
      return y if d is None else y + d

    norm = lambda name: RMSNorm(c.norm_eps, c.dtype, c.param_dtype, name=name)
    heads = (c.n_heads, c.head_dim)

    h = norm("attn_norm")(x)
    qkv_names = ("embed", "heads", "kv")
    q = dense(h, "bld,dhk->blhk", heads, qkv_names, "q_proj")
    k = dense(h, "bld,dhk->blhk", heads, qkv_names, "k_proj")
    v = dense(h, "bld,dhk->blhk", heads, qkv_names, "v_proj")
    qkv_axes = ("batch", "length", "heads", "kv")
    q = _constrain(apply_rope(q, cos, sin), qkv_axes)
    k = _constrain(apply_rope(k, cos, sin), qkv_axes)
    v = _constrain(v, qkv_axes)
    if kv is not None:
      rows = jnp.arange(x.shape[0])[:, None]
      k = _constrain(kv[0].at[rows, positions].set(k.astype(kv[0].dtype)), qkv_axes)
      v = _constrain(kv[1].at[rows, positions].set(v.astype(kv[1].dtype)), qkv_axes)
    att = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=False, implementation=c.attention_impl)
    att = _constrain(att, qkv_axes)
    x = x + dense(att, "blhk,hkd->bld", (c.d_model,), ("heads", "kv", "embed"), "attn_out")
    x = _constrain(x, ("batch", "length", "embed"))

    h = norm("ff_norm")(x)
    gate = dense(h, "bld,dm->blm", (c.mlp_hidden,), ("embed", "mlp"), "ff_proj")
    up = dense(h, "bld,dm->blm", (c.mlp_hidden,), ("embed", "mlp"), "up_proj")
    hidden = _constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
    x = x + dense(hidden, "blm,md->bld", (c.d_model,), ("mlp", "embed"), "ff_out")
    x = _constrain(x, ("batch", "length", "embed"))
    return x, ((k, v) if self.return_kv or kv is not None else None)


def _select_positions(x: jax.Array, select) -> jax.Array:
  """x[:, select]; a static slice when ``select`` is a contiguous host range (no gather)."""
  if isinstance(select, np.ndarray) and select.size and np.all(np.diff(select) == 1):
    return x[:, int(select[0]) : int(select[-1]) + 1]
  return jnp.take(x, jnp.asarray(select, jnp.int32), axis=1)


class KVCache(NamedTuple):
  """Every layer's keys (after RoPE) and values of a sequence batch: k, v [n_layers, B, L, H, Dh]
  in the compute dtype."""

  k: jax.Array
  v: jax.Array


class LLaDA(nn.Module):
  """The LLaDA backbone with an untied LM head. Params: ``wte, [wpe], blocks | block_{i}, ln_f, lm_head``."""

  config: LLaDAConfig

  @nn.compact
  def __call__(
      self,
      tokens: jax.Array,
      *,
      select: np.ndarray | jax.Array | None = None,
      head_rows: tuple[int, int] | None = None,
      return_kv: bool = False,
      positions: jax.Array | None = None,
      kv_cache: KVCache | None = None,
  ):
    """Forward pass, full or (``positions``) partial against a K/V cache.

    Args:
      tokens: int32[B, L] token ids in [0, vocab_size).
      select: optional int[N] positions in [0, L) whose hidden states reach the head (the image
        slots); None = all L positions. A contiguous numpy range becomes a static slice.
      head_rows: optional (offset, count): multiply only by LM-head rows [offset, offset+count)
        (the codebook slice), sliced before the matmul.
      return_kv: also return every layer's keys (after RoPE) and values as a ``KVCache``.
      positions: int32[B, P] distinct positions in [0, L) per row: run only the tokens of
        ``tokens`` at these positions through the blocks, against ``kv_cache`` (the keys and
        values of the other positions are read from it, whatever tokens they were computed from).
      kv_cache: the ``KVCache`` of a previous call on sequences of the same length (with
        ``positions`` only).

    Returns:
      float32[B, N or L, count or V] logits; with ``return_kv`` the pair (logits, ``KVCache``);
      with ``positions`` the pair (float32[B, P, count or V] logits at those positions, the
      ``KVCache`` updated at them).

    Raises:
      ValueError: bad token rank, sequence longer than the learned position table, head_rows
        outside the vocabulary, or a partial call without a cache / with ``select``.
    """
    c = self.config
    if tokens.ndim != 2:
      raise ValueError(f"LLaDA tokens must be int[B, L], got shape {tokens.shape}")
    batch, length = tokens.shape
    if c.learned_pos_emb and length > c.learned_pos_emb:
      raise ValueError(f"LLaDA tokens length {length} exceeds learned_pos_emb={c.learned_pos_emb}")
    if head_rows is not None:
      off, cnt = head_rows
      if off < 0 or cnt <= 0 or off + cnt > c.vocab_size:
        raise ValueError(f"LLaDA head_rows={head_rows} outside vocab_size={c.vocab_size}")
    partial = positions is not None
    if partial:
      if kv_cache is None or select is not None:
        raise ValueError("LLaDA positions= (a partial forward) needs kv_cache= and no select=")
      if positions.ndim != 2 or positions.shape[0] != batch:
        raise ValueError(f"LLaDA positions must be int[B={batch}, P], got shape {positions.shape}")
      want = (c.n_layers, batch, length, c.n_heads, c.head_dim)
      if kv_cache.k.shape != want or kv_cache.v.shape != want:
        raise ValueError(f"LLaDA kv_cache k/v shapes {kv_cache.k.shape}/{kv_cache.v.shape}, expected {want}")
    elif kv_cache is not None:
      raise ValueError("LLaDA kv_cache= is only read by a partial forward (positions=)")
    init = nn.initializers.normal(c.init_std)

    wte = self.param(
        "wte", nn.with_logical_partitioning(init, ("vocab", "embed")), (c.vocab_size, c.d_model), c.param_dtype
    )
    run_tokens = jnp.take_along_axis(tokens, positions, axis=1) if partial else tokens
    x = jnp.take(wte, run_tokens, axis=0).astype(c.dtype)
    if c.learned_pos_emb:
      wpe = self.param(
          "wpe", nn.with_logical_partitioning(init, ("length", "embed")), (c.learned_pos_emb, c.d_model), c.param_dtype
      )
      pos_emb = jnp.take(wpe, positions, axis=0) if partial else wpe[None, :length]
      x = x + pos_emb.astype(c.dtype)
    x = _constrain(x, ("batch", "length", "embed"))

    # Key-only pad mask [B, 1, 1, L]: non-pad outputs equal the reference's pairwise mask, and pad
    # query rows stay finite (they attend to the real keys instead of a uniform all-masked row).
    mask = (tokens != c.pad_id)[:, None, None, :] if c.use_pad_mask else None
    cos, sin = rope_tables(length, c.head_dim, c.rope_theta)
    if partial:  # each recomputed query and key is rotated at its own absolute position
      cos, sin = jnp.take(cos, positions, axis=0), jnp.take(sin, positions, axis=0)

    block = Block
    if c.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
    if c.scan_layers:
      in_axes = (nn.broadcast,) * 3 + ((0, nn.broadcast) if partial else ())
      stack = nn.scan(
          block,
          variable_axes={"params": 0, lora_lib.COLLECTION: 0},
          split_rngs={"params": True, lora_lib.RNG: True, "dropout": True},
          in_axes=in_axes,
          length=c.n_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      cache_args = (tuple(kv_cache), positions) if partial else ()
      x, kv = stack(c, return_kv, name="blocks")(x, mask, cos, sin, *cache_args)
    else:
      per_layer = []
      for i in range(c.n_layers):
        cache_args = ((kv_cache.k[i], kv_cache.v[i]), positions) if partial else ()
        x, kv_i = block(c, return_kv, name=f"block_{i}")(x, mask, cos, sin, *cache_args)
        per_layer.append(kv_i)
      kv = None if per_layer[0] is None else tuple(jnp.stack(t) for t in zip(*per_layer))

    if select is not None:
      x = _select_positions(x, select)
    x = RMSNorm(c.norm_eps, c.dtype, c.param_dtype, name="ln_f")(x)
    head = self.param(
        "lm_head", nn.with_logical_partitioning(init, ("embed", "vocab")), (c.d_model, c.vocab_size), c.param_dtype
    )
    out_axis = "vocab"
    if head_rows is not None:
      head = head[:, head_rows[0] : head_rows[0] + head_rows[1]]
      out_axis = "codebook"
    logits = jnp.einsum("bld,dv->blv", x, head.astype(c.dtype), preferred_element_type=jnp.float32)
    logits = _constrain(logits, ("batch", "length", out_axis))
    if return_kv or partial:
      kv_axes = ("layers", "batch", "length", "heads", "kv")
      return logits, KVCache(_constrain(kv[0], kv_axes), _constrain(kv[1], kv_axes))
    return logits


def count_params(tree: Any) -> int:
  """Number of scalars in a params pytree (arrays or ShapeDtypeStructs)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
