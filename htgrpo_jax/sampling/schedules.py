"""Mask schedules: the fraction of image tokens still masked at time r in [0, 1].

A schedule gamma maps r = s / T (s steps done out of T) to the masked fraction, with gamma(0) = 1,
gamma(1) = 0 and gamma non-increasing. MaskGIT keeps floor(N * gamma((s + 1) / T)) tokens masked
after step s; the MDLM "emerge" rule unmasks each masked token at step s with probability
(gamma(s / T) - gamma((s + 1) / T)) / gamma(s / T).

Names: ``cosine`` (default, MMaDA / DiMOO / MaskGRPO), ``linear``, ``pow<k>`` (1 - r^k, e.g.
``pow2``, ``pow0.5``) and ``sigmoid`` (MUSE's sigmoid ramp over [-3, 3]).
The functions take numpy or JAX arrays; samplers evaluate them on the host into static tables.
The fixed names are registered in ``SCHEDULE_REGISTRY``; ``pow<k>`` is a family parsed from its name.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from htgrpo_jax.contracts import Registry

Schedule = Callable[[np.ndarray], np.ndarray]

SCHEDULE_NAMES = ("cosine", "linear", "pow<k>", "sigmoid")  # what errors list; pow<k> is parsed

SCHEDULE_REGISTRY: Registry[Schedule] = Registry("schedule")


def _xp(r):
  return jnp if isinstance(r, jax.Array) else np


@SCHEDULE_REGISTRY.register("cosine")
def cosine(r):
  return _xp(r).cos(0.5 * math.pi * r)


@SCHEDULE_REGISTRY.register("linear")
def linear(r):
  return 1.0 - r


def power(exponent: float) -> Schedule:
  """1 - r^k: k > 1 unmasks slowly at first (MaskGIT's ``pow``), k < 1 front-loads."""

  def fn(r):
    return 1.0 - r**exponent

  return fn


@SCHEDULE_REGISTRY.register("sigmoid")
def sigmoid(r, start: float = -3.0, end: float = 3.0, tau: float = 1.0):
  """A sigmoid ramp rescaled so that gamma(0) = 1 and gamma(1) = 0 exactly."""
  xp = _xp(r)
  sig = lambda z: 1.0 / (1.0 + xp.exp(-z))
  v_start, v_end = sig(start / tau), sig(end / tau)
  out = sig((r * (end - start) + start) / tau)
  return xp.clip((v_end - out) / (v_end - v_start), 0.0, 1.0)


def get_schedule(name: str) -> Schedule:
  """Returns the schedule called ``name``.

  Raises:
    ValueError: unknown name or a bad ``pow`` exponent, naming the ``schedule`` field.
  """
  if name in SCHEDULE_REGISTRY:
    return SCHEDULE_REGISTRY.get(name)
  if name.startswith("pow"):
    try:
      k = float(name[3:])
    except ValueError:
      k = float("nan")
    if not (k > 0 and math.isfinite(k)):
      raise ValueError(f"schedule: {name!r} needs a positive finite exponent, e.g. 'pow2'")
    return power(k)
  raise ValueError(f"schedule: unknown {name!r}; choose from {SCHEDULE_NAMES}")


def masked_fractions(name: str, num_steps: int) -> np.ndarray:
  """float64[T + 1]: gamma(s / T) for s = 0..T (entry s = fraction masked before step s)."""
  r = np.arange(num_steps + 1, dtype=np.float64) / num_steps
  g = np.asarray(get_schedule(name)(r), dtype=np.float64)
  # Pin the end points: float round-off (cos(pi/2) = 6e-17) must not leave a token masked.
  g[0], g[-1] = 1.0, 0.0
  return g
