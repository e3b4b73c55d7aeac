"""Independent NumPy references of the rl building blocks (float64, loops where the JAX code
vectorises), shared by the rl tests."""

import math

import numpy as np


def np_group_advantages(r, g, eps, ddof):
  out = np.empty_like(r, dtype=np.float64)
  for i in range(0, len(r), g):
    grp = r[i : i + g].astype(np.float64)
    out[i : i + g] = (grp - grp.mean()) / (grp.std(ddof=ddof) + eps)
  return out


def np_partition(step, ent, t, sketch_fraction, structure_ratio, mode):
  b, n = step.shape
  sk = max(1, math.ceil(sketch_fraction * t - 1e-9))
  ns = max(1, math.ceil(structure_ratio * n - 1e-9))
  out = np.zeros((b, n), bool)
  for i in range(b):
    cand = [j for j in range(n) if 0 <= step[i, j] < sk]
    if mode == "entropy":
      cand.sort(key=lambda j: (-float(ent[i, j]), j))
    else:
      cand.sort(key=lambda j: (int(step[i, j]), -float(ent[i, j]), j))
    out[i, cand[:ns]] = True
  return out


def np_credit(is_s, sw, rw, normalize):
  w = np.where(is_s, sw, rw).astype(np.float64)
  if normalize:
    m = w.mean(axis=1, keepdims=True)
    w = w / np.where(m > 0, m, 1.0)
  return w


def np_loss(logp, old, ref, adv, mask, eps, beta):
  """Case form of PPO-clip: A >= 0 caps rho at 1+eps, A < 0 floors it at 1-eps."""
  rho = np.exp(logp - old)
  pg = np.where(adv >= 0, -adv * np.minimum(rho, 1 + eps), -adv * np.maximum(rho, 1 - eps))
  kl = np.exp(ref - logp) - (ref - logp) - 1
  # d/dlogp: the unclipped branch is active unless rho is beyond the cap in the advantage's direction.
  active = np.where(adv >= 0, rho <= 1 + eps, rho >= 1 - eps)
  grad = np.where(active, -adv * rho, 0.0) + beta * (1 - np.exp(ref - logp))
  m = mask.astype(np.float64)
  clipped = np.where(adv > 0, rho > 1 + eps, np.where(adv < 0, rho < 1 - eps, False))
  extra = {
      "ratio_mean": (rho * m).sum(),
      "clip_frac": (clipped * m).sum(),
      "approx_kl": ((rho - 1 - np.log(rho)) * m).sum(),
      "kl": (kl * m).sum(),
      "logp": (logp * m).sum(),
      "logp_adv": (logp * adv * m).sum(),
  }
  return ((pg + beta * kl) * m).sum(), m.sum(), grad * m, extra


def rollout_record(seed, b=4, n=24, c=6, t=6):
  """A random rollout record: (tokens int32[b, n] in [0, c), commit_step int32[b, n] in [0, t),
  entropy float32[b, n] in [0, 1))."""
  import jax.numpy as jnp

  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, c, (b, n)), jnp.int32)
  step = jnp.asarray(rng.integers(0, t, (b, n)), jnp.int32)
  ent = jnp.asarray(rng.random((b, n)), jnp.float32)
  return tokens, step, ent
