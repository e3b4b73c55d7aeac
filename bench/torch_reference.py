"""The HT-GRPO update in eager PyTorch, written the way the peers (MaskGRPO, TraceRL, Flow-GRPO) write theirs.

It is the yardstick of ``bench/train_step.py --vs_torch``: the same LLaDA backbone (``models/llada.py``:
learned positions, RMSNorm, NeoX RoPE in fp32, bidirectional MHA, gated SiLU MLP, LM head sliced to the
codebook rows), the same K canvases and loss sets, the same PPO-clip + k3-KL token loss divided by the
iteration's token count, global-norm clipping and AdamW, in fp32. The old and reference log-probs run once
per distinct canvas under ``torch.no_grad`` (as the JAX step does), then K forward + backward + optimizer
steps.

What it does not redo: the canvases, loss sets and credit-weighted token advantages come from
``prepare_update`` (the JAX estimator code run once on the host), since they are integer bookkeeping on
[B, N] arrays, a negligible part of the JAX step's time that the JAX side still pays on every call (so the
comparison is, if anything, kind to PyTorch). Nor does it check finiteness before applying an update (the
JAX step's skip guard; peers do not have one).

torch is imported by this file only (never by the package). ``tests/test_torch_reference.py`` checks that
the JAX step and this reference give the same losses, gradients and updated weights from the same weights.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from htgrpo_jax import rl
from htgrpo_jax.rl import estimators, hierarchy
from htgrpo_jax.rl.train_step import update_sets


@dataclasses.dataclass(frozen=True)
class UpdateInputs:
  """What every inner iteration consumes, as numpy (K iterations, D distinct canvases).

  canvases: int32[K, B, N] (MASK = -1 where masked); loss_masks: bool[K, B, N]; token_adv: float32[K, B, N]
  (group advantage x credit); groups: K ints, the distinct canvas of each iteration; representative: D
  ints, the first iteration of each distinct canvas.
  """

  prompt_tokens: np.ndarray
  image_tokens: np.ndarray
  canvases: np.ndarray
  loss_masks: np.ndarray
  token_adv: np.ndarray
  groups: tuple[int, ...]
  representative: tuple[int, ...]


def prepare_update(config: rl.HTGRPOConfig, rollout: rl.Rollout, key: jax.Array, step: int = 0) -> UpdateInputs:
  """The canvases, loss sets and token advantages ``rl.make_train_step`` draws at ``state.step == step``."""
  sets = update_sets(config, rollout, jax.random.fold_in(key, step))
  canvases, masks = sets.canvases, sets.loss_masks
  adv = jnp.stack(
      [
          sets.token_adv
          * (hierarchy.loss_set_credit(sets.credit, m) if sets.stage_credit else sets.credit)
          * rw[:, None]
          for m, rw in zip(masks, sets.replay_weights)
      ]
  )
  groups = estimators.canvas_groups(config)
  representative = tuple(groups.index(d) for d in range(max(groups) + 1))
  return UpdateInputs(
      np.asarray(rollout.prompt_tokens),
      np.asarray(rollout.image_tokens),
      np.asarray(canvases),
      np.asarray(masks),
      np.asarray(adv, np.float32),
      groups,
      representative,
  )


class TorchLLaDA(torch.nn.Module):
  """``models/llada.py``'s LLaDA (fp32, no pad mask, learned positions) as a plain ``torch.nn.Module``.

  Weights are held in ``nn.Linear`` layout ([out, in]); ``load_flax`` copies them from Flax params.
  """

  def __init__(self, cfg, *, prompt_len: int, mask_id: int, offset: int, codebook: int):
    super().__init__()
    if cfg.use_pad_mask or not cfg.learned_pos_emb:
      raise ValueError("TorchLLaDA covers the ShapeEval backbone: learned positions, no pad mask")
    self.cfg, self.prompt_len, self.mask_id = cfg, prompt_len, mask_id
    self.offset, self.codebook = offset, codebook
    d, m = cfg.d_model, cfg.mlp_hidden
    p = lambda *shape: torch.nn.Parameter(torch.zeros(*shape))
    self.wte, self.wpe = p(cfg.vocab_size, d), p(cfg.learned_pos_emb, d)
    self.blocks = torch.nn.ModuleList()
    for _ in range(cfg.n_layers):
      blk = torch.nn.Module()
      blk.attn_norm, blk.ff_norm = p(d), p(d)
      blk.q, blk.k, blk.v, blk.o = p(d, d), p(d, d), p(d, d), p(d, d)
      blk.gate, blk.up, blk.down = p(m, d), p(m, d), p(d, m)
      self.blocks.append(blk)
    self.ln_f, self.lm_head = p(d), p(cfg.vocab_size, d)
    self._rope = {}

  # Flax name -> (torch attribute, Flax array -> [out, in] matrix).
  @staticmethod
  def _block_map(d):
    scale = lambda a: np.asarray(a["scale"])
    qkv = lambda a: np.asarray(a).reshape(d, -1).T
    mat = lambda a: np.asarray(a).T
    return {
        "attn_norm": ("attn_norm", scale),
        "ff_norm": ("ff_norm", scale),
        "q_proj": ("q", qkv),
        "k_proj": ("k", qkv),
        "v_proj": ("v", qkv),
        "attn_out": ("o", lambda a: np.asarray(a).reshape(-1, d).T),
        "ff_proj": ("gate", mat),
        "up_proj": ("up", mat),
        "ff_out": ("down", mat),
    }

  def load_flax(self, params) -> "TorchLLaDA":
    t = lambda a: torch.from_numpy(np.array(a, np.float32))
    with torch.no_grad():
      self.wte.copy_(t(params["wte"]))
      self.wpe.copy_(t(params["wpe"]))
      self.ln_f.copy_(t(params["ln_f"]["scale"]))
      self.lm_head.copy_(t(np.asarray(params["lm_head"]).T))
      for i, blk in enumerate(self.blocks):
        for name, (attr, conv) in self._block_map(self.cfg.d_model).items():
          getattr(blk, attr).copy_(t(conv(params[f"block_{i}"][name])))
    return self

  def flax_grads(self) -> dict:
    """The ``.grad`` of every weight, in the Flax params' layout (numpy), for comparisons."""
    cfg, d = self.cfg, self.cfg.d_model
    g = lambda p: p.grad.detach().cpu().numpy().copy()  # clipping scales .grad in place
    heads = (d, cfg.n_heads, cfg.head_dim)
    out = {"wte": g(self.wte), "wpe": g(self.wpe), "ln_f": {"scale": g(self.ln_f)}, "lm_head": g(self.lm_head).T}
    for i, b in enumerate(self.blocks):
      out[f"block_{i}"] = {
          "attn_norm": {"scale": g(b.attn_norm)},
          "ff_norm": {"scale": g(b.ff_norm)},
          "q_proj": g(b.q).T.reshape(heads),
          "k_proj": g(b.k).T.reshape(heads),
          "v_proj": g(b.v).T.reshape(heads),
          "attn_out": g(b.o).T.reshape(heads[1:] + (d,)),
          "ff_proj": g(b.gate).T,
          "up_proj": g(b.up).T,
          "ff_out": g(b.down).T,
      }
    return out

  def flax_params(self) -> dict:
    """The weights in the Flax params' layout (numpy)."""
    saved = {p: p.grad for p in self.parameters()}
    for p in self.parameters():
      p.grad = p.detach()
    out = self.flax_grads()
    for p, gr in saved.items():
      p.grad = gr
    return out

  def _rope_tables(self, length):
    if length not in self._rope:
      dh = self.cfg.head_dim
      inv = 1.0 / (self.cfg.rope_theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
      emb = np.concatenate([np.outer(np.arange(length), inv)] * 2, axis=-1)
      dev = self.wte.device
      self._rope[length] = (
          torch.from_numpy(np.cos(emb).astype(np.float32)).to(dev),
          torch.from_numpy(np.sin(emb).astype(np.float32)).to(dev),
      )
    return self._rope[length]

  @staticmethod
  def _rms(x, scale, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale

  def forward(self, prompt: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """prompt int64[B, Lp], canvas int64[B, N] (-1 = masked) -> codebook logits float32[B, N, C]."""
    cfg = self.cfg
    tokens = torch.cat([prompt, torch.where(canvas < 0, self.mask_id, canvas + self.offset)], dim=1)
    bsz, length = tokens.shape
    h_, dh = cfg.n_heads, cfg.head_dim
    cos, sin = self._rope_tables(length)
    half = dh // 2

    def rope(x):  # [B, H, L, Dh]
      return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    x = self.wte[tokens] + self.wpe[:length]
    for b in self.blocks:
      h = self._rms(x, b.attn_norm, cfg.norm_eps)
      q, k, v = (F.linear(h, w).view(bsz, length, h_, dh).transpose(1, 2) for w in (b.q, b.k, b.v))
      att = F.scaled_dot_product_attention(rope(q), rope(k), v)
      x = x + F.linear(att.transpose(1, 2).reshape(bsz, length, -1), b.o)
      h = self._rms(x, b.ff_norm, cfg.norm_eps)
      x = x + F.linear(F.silu(F.linear(h, b.gate)) * F.linear(h, b.up), b.down)
    x = self._rms(x[:, self.prompt_len :], self.ln_f, cfg.norm_eps)
    return F.linear(x, self.lm_head[self.offset : self.offset + self.codebook])


def _token_logp(logits, tokens):
  logp_all = torch.log_softmax(logits, dim=-1)
  return logp_all.gather(-1, tokens[..., None])[..., 0], logp_all


class TorchUpdate:
  """One HT-GRPO update (``rl.make_train_step``'s maths) on a ``TorchLLaDA``, with global-norm clipping and
  ``torch.optim.AdamW``.

  Call ``run(inputs)`` once per RL step; it returns the per-iteration token-mean losses (float list).
  """

  def __init__(
      self,
      model: TorchLLaDA,
      config: rl.HTGRPOConfig,
      *,
      lr: float,
      clip_norm: float = 1.0,
      weight_decay: float = 0.01,
      ref_model: TorchLLaDA | None = None,
  ):
    self.model, self.config, self.clip_norm = model, config, clip_norm
    self.ref_model = ref_model
    if config.beta > 0 and ref_model is None:
      raise ValueError(f"TorchUpdate: beta={config.beta} > 0 needs ref_model")
    self.params = list(model.parameters())
    self.opt = torch.optim.AdamW(
        self.params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, foreach=True
    )

  def _clip(self):
    grads = [p.grad for p in self.params]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    # optax.clip_by_global_norm: g * max / |g| when |g| >= max. As a clamped factor rather than an
    # `if` on the norm, so a GPU run does not wait for the device once per iteration.
    torch._foreach_mul_(grads, torch.clamp(self.clip_norm / norm, max=1.0))
    return norm

  def run(self, inputs: UpdateInputs, grad_hook=None) -> list[float]:
    """K inner iterations. ``grad_hook(k, model)``, when given, sees the raw gradients of iteration k."""
    c, dev = self.config, self.model.wte.device
    on = lambda a, dtype: torch.from_numpy(np.array(a, dtype)).to(dev)  # a writable copy
    prompt = on(inputs.prompt_tokens, np.int64)
    tokens = on(inputs.image_tokens, np.int64)
    canvases = on(inputs.canvases, np.int64)
    with torch.no_grad():
      old = [_token_logp(self.model(prompt, canvases[d]), tokens)[0] for d in inputs.representative]
      ref = (
          [_token_logp(self.ref_model(prompt, canvases[d]), tokens)[0] for d in inputs.representative]
          if c.beta > 0
          else None
      )
    losses = []
    for k in range(c.num_iterations):
      g = inputs.groups[k]
      mask = on(inputs.loss_masks[k], np.float32)
      adv = on(inputs.token_adv[k], np.float32)
      denom = max(float(inputs.loss_masks[k].sum()), 1.0)  # from the host copy: no device sync
      self.opt.zero_grad(set_to_none=True)
      logp, logp_all = _token_logp(self.model(prompt, canvases[k]), tokens)
      rho = torch.exp(logp - old[g])
      pg = -torch.minimum(rho * adv, torch.clamp(rho, 1.0 - c.clip_eps, 1.0 + c.clip_eps) * adv)
      tok = pg
      if c.beta > 0:
        dlt = ref[g] - logp
        tok = pg + c.beta * (torch.exp(dlt) - dlt - 1.0)
      loss = (tok * mask).sum() / denom
      loss.backward()
      with torch.no_grad():  # the step logs the entropy of the scored distributions too
        (-(logp_all.exp() * logp_all).sum(-1) * mask).sum()
      if grad_hook is not None:
        grad_hook(k, self.model)
      self._clip()
      self.opt.step()
      losses.append(loss.detach())
    return torch.stack(losses).tolist()  # one device sync per update, as a careful eager loop logs


def build(
    cfg,
    params,
    config: rl.HTGRPOConfig,
    *,
    prompt_len: int,
    mask_id: int,
    offset: int,
    codebook: int,
    lr: float,
    weight_decay: float = 0.01,
    clip_norm: float = 1.0,
    device: str = "cpu",
) -> TorchUpdate:
  """A ``TorchUpdate`` whose policy (and frozen reference, when beta > 0) start from Flax ``params``,
  on ``device`` ('cpu', 'cuda')."""
  make = lambda: (
      TorchLLaDA(cfg, prompt_len=prompt_len, mask_id=mask_id, offset=offset, codebook=codebook)
      .load_flax(params)
      .to(device)
  )
  ref = None
  if config.beta > 0:
    ref = make()
    ref.requires_grad_(False)
  return TorchUpdate(make(), config, lr=lr, clip_norm=clip_norm, weight_decay=weight_decay, ref_model=ref)


def thread_count() -> int:
  """The CPUs this process may use (XLA:CPU sizes its intra-op pool from the same affinity mask)."""
  return len(os.sched_getaffinity(0))
