"""The HT-GRPO token loss: PPO-clip on the token ratio with token-level advantages, plus a k3-KL penalty.

The loss comes back unreduced (a sum and a token count) so micro-batches and devices aggregate exactly:
the global token mean is sum(sums) / sum(counts). Metrics likewise come back as sums (plus min/max) and
are turned into means by ``finalize_metrics``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SUM_METRICS = (
    "loss",
    "pg_loss",
    "kl",
    "clip_frac",
    "approx_kl",
    "ratio_mean",
    "entropy",
    "advantage",
    "credit",
    "logp",
    "logp_adv",
)


def token_logp_entropy(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """fp32 log pi(token) and entropy per slot.

  Args:
    logits: float[B, N, C] codebook logits (any float dtype; upcast to fp32).
    tokens: int32[B, N] codes in [0, C).

  Returns:
    (logp float32[B, N], entropy float32[B, N]).
  """
  logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  logp = jnp.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0]
  entropy = -(jnp.exp(logp_all) * logp_all).sum(axis=-1)
  return logp, entropy


def ht_grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array | None,
    token_adv: jax.Array,
    loss_mask: jax.Array,
    *,
    clip_eps: float,
    beta: float,
    entropy: jax.Array | None = None,
    credit: jax.Array | None = None,
    entropy_coef: float = 0.0,
) -> tuple[jax.Array, jax.Array, dict]:
  """Unreduced PPO-clip + k3-KL loss over the loss-mask tokens.

  Per token: rho = exp(logp - old_logp); pg = -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A);
  kl = exp(ref - logp) - (ref - logp) - 1; loss = pg + beta * kl - entropy_coef * entropy.

  Args:
    logp: float32[B, N] log pi_theta(token | canvas) (differentiable).
    old_logp: float32[B, N] the same under the policy at the start of the step (no gradient).
    ref_logp: float32[B, N] the same under the reference policy, or None when beta == 0.
    token_adv: float32[B, N] token-level advantage A_g * w.
    loss_mask: bool[B, N] tokens in the loss.
    clip_eps: PPO epsilon.
    beta: KL weight.
    entropy: optional float32[B, N] policy entropy per slot: a metric, and with ``entropy_coef`` > 0
      a bonus the gradient flows through (required then).
    credit: optional float32[B, N] the credit weight w inside ``token_adv`` (metric only).
    entropy_coef: weight of the entropy bonus, >= 0 (0: the entropy is a metric only).

  Returns:
    (loss_sum float32[], count float32[], metrics): ``metrics`` holds sums over the mask for
    ``SUM_METRICS`` and ``ratio_min``/``ratio_max`` (+inf/-inf when the mask is empty).
  """
  m = loss_mask.astype(jnp.float32)
  old_logp = jax.lax.stop_gradient(old_logp)
  log_ratio = logp - old_logp
  rho = jnp.exp(log_ratio)
  unclipped = rho * token_adv
  clipped = jnp.clip(rho, 1.0 - clip_eps, 1.0 + clip_eps) * token_adv
  pg = -jnp.minimum(unclipped, clipped)
  if ref_logp is not None and beta != 0.0:
    d = jax.lax.stop_gradient(ref_logp) - logp
    kl = jnp.exp(d) - d - 1.0
  else:
    kl = jnp.zeros_like(logp)
  tok = pg + beta * kl if beta != 0.0 else pg
  if entropy_coef != 0.0:
    if entropy is None:
      raise ValueError(f"ht_grpo_loss: entropy_coef={entropy_coef} needs the per-token entropy")
    tok = tok - entropy_coef * entropy
  s = lambda x: (x * m).sum()
  ratio_sg = jax.lax.stop_gradient(rho)
  lr_sg = jax.lax.stop_gradient(log_ratio)
  metrics = {
      "loss": jax.lax.stop_gradient(s(tok)),
      "pg_loss": jax.lax.stop_gradient(s(pg)),
      "kl": jax.lax.stop_gradient(s(kl)),
      "clip_frac": s((clipped < unclipped).astype(jnp.float32)),
      # k3 estimate of KL(old || new) from tokens drawn under old: rho - 1 - log rho >= 0, 0 at rho == 1.
      "approx_kl": s(jnp.expm1(lr_sg) - lr_sg),
      "ratio_mean": s(ratio_sg),
      "entropy": s(jax.lax.stop_gradient(entropy)) if entropy is not None else jnp.float32(0.0),
      "advantage": s(token_adv),
      "credit": s(credit) if credit is not None else jnp.float32(0.0),
      # Sums for the covariance of log pi(token) with its advantage (``finalize_metrics``): for a
      # natural-gradient step on a softmax the first-order entropy change is -lr * that covariance,
      # so its sign says whether a stage sharpens (> 0) or flattens (< 0) the positions it trains
      # (for a plain step, in sign on the whole; not about tokens it does not train).
      "logp": s(jax.lax.stop_gradient(logp)),
      "logp_adv": s(jax.lax.stop_gradient(logp) * token_adv),
      "ratio_min": jnp.where(loss_mask, ratio_sg, jnp.inf).min(),
      "ratio_max": jnp.where(loss_mask, ratio_sg, -jnp.inf).max(),
  }
  return s(tok), m.sum(), metrics


def combine_metrics(a: dict, b: dict) -> dict:
  """Aggregates two metric dicts from ``ht_grpo_loss`` (sums add, min/max combine); ``count`` adds."""
  out = {k: a[k] + b[k] for k in a if k not in ("ratio_min", "ratio_max")}
  out["ratio_min"] = jnp.minimum(a["ratio_min"], b["ratio_min"])
  out["ratio_max"] = jnp.maximum(a["ratio_max"], b["ratio_max"])
  return out


def finalize_metrics(sums: dict, count: jax.Array) -> dict:
  """Token means of the summed metrics (0 when ``count`` is 0), min/max passed through, and
  ``logp_adv_cov``: the token covariance of log pi(token) with the token advantage,
  mean(logp * A) - mean(logp) * mean(A)."""
  denom = jnp.maximum(count, 1.0)
  out = {k: sums[k] / denom for k in SUM_METRICS}
  out["logp_adv_cov"] = out["logp_adv"] - out["logp"] * out["advantage"]
  out["ratio_min"], out["ratio_max"] = sums["ratio_min"], sums["ratio_max"]
  out["tokens"] = count
  return out
