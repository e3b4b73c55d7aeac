"""``SamplerConfig``: the static description of a sketch/paint sampler, validated on construction.

Everything here is static (hashable, known at trace time): it fixes the number of loop steps,
the per-step commit counts and temperature tables, and whether the unconditional CFG half runs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from htgrpo_jax.sampling import schedules

RULES = ("maskgit", "emerge")
CACHE_KEYS = ("enabled", "ratio", "warmup_ratio", "refresh_interval")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  """The rollout cache (Lumina-DiMOO's ML-Cache; docs/performance.md, "Rollout cache").

  Steps ``s <= int(T * warmup_ratio)``, every ``refresh_interval``-th step after that, and the first
  paint step are full forwards that refresh every layer's keys and values and every position's
  logits. On the other steps only the k = floor((1 - ratio) * (L - 1)) + 1 positions (of the L
  sequence positions, pads excluded) whose cached max logit is lowest are run: their queries
  attend against the cached keys and values (stale for the other positions, whose tokens may have
  changed since) and their logits replace the cached ones. The drawn distribution is therefore
  not the policy's, which is why training rollouts refuse the cache (``run_config.plan``).

  Attributes:
    enabled: use the cache (False: every step is a full forward, the plain sampler).
    ratio: fraction of positions kept from the cache on a cached step, in [0, 1) (0: every
      position is recomputed, against fresh keys: the uncached sampler up to float round-off).
    warmup_ratio: fraction of the T steps run in full first, in [0, 1].
    refresh_interval: a full refresh every this many steps after the warmup (int >= 1; 1: every
      step is full).
  """

  enabled: bool = False
  ratio: float = 0.9
  warmup_ratio: float = 0.3
  refresh_interval: int = 5

  def __post_init__(self):
    def fail(field, msg):
      raise ValueError(f"SamplerConfig.cache.{field}: {msg}")

    if not isinstance(self.enabled, (bool, np.bool_)):
      fail("enabled", f"must be True or False, got {self.enabled!r}")
    for f, hi_open in (("ratio", True), ("warmup_ratio", False)):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        fail(f, f"must be a number, got {v!r}")
      if not (0 <= v < 1 if hi_open else 0 <= v <= 1):
        fail(f, f"must be in [0, {'1)' if hi_open else '1]'}, got {v}")
    v = self.refresh_interval
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      fail("refresh_interval", f"must be an int >= 1, got {v!r}")
    object.__setattr__(self, "enabled", bool(self.enabled))
    object.__setattr__(self, "ratio", float(self.ratio))
    object.__setattr__(self, "warmup_ratio", float(self.warmup_ratio))
    object.__setattr__(self, "refresh_interval", int(self.refresh_interval))

  @classmethod
  def from_mapping(cls, m: Mapping[str, Any]) -> "CacheConfig":
    """From a dict / ConfigDict; unknown keys raise, naming them."""
    unknown = sorted(set(m) - set(CACHE_KEYS))
    if unknown:
      raise ValueError(f"SamplerConfig.cache: unknown keys {unknown}; valid keys {list(CACHE_KEYS)}")
    return cls(**dict(m))

  def num_recomputed(self, length: int) -> int:
    """k, the positions a cached step recomputes out of ``length``: as DiMOO's ``conf <=
    quantile(conf, 1 - ratio)`` (linear interpolation), floor((1 - ratio) * (length - 1)) + 1."""
    return min(length, int(math.floor((1.0 - self.ratio) * (length - 1) + 1e-9)) + 1)

  def refresh_steps(self, num_steps: int, sketch_steps: int) -> np.ndarray:
    """bool[T]: the full-forward steps. Step ``sketch_steps`` (the first paint step) is always one,
    so ``paint(sketch(.))`` draws what ``sample`` does: the cache does not outlive a call."""
    s = np.arange(num_steps)
    warmup = int(num_steps * self.warmup_ratio)
    full = (s <= warmup) | ((s - warmup) % self.refresh_interval == 0)
    full[min(sketch_steps, num_steps - 1)] = True
    return full if self.enabled else np.ones(num_steps, bool)


TEMPERATURE_MODES = ("mmada_annealed", "constant")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Static sampler settings.

  Attributes:
    num_steps: T, the number of unmasking steps (>= 1).
    sketch_steps: steps [0, sketch_steps) form the sketch phase, [sketch_steps, T) the paint
      phase; 0 < sketch_steps <= T (== T makes ``paint`` a no-op that only packs the record).
    rule: ``'maskgit'`` (sample every masked slot, keep the most confident; exact counts per step)
      or ``'emerge'`` (MaskGRPO / MDLM: each masked slot unmasks independently with probability
      (g_s - g_{s+1}) / g_s, in random order).
    schedule: mask schedule name (see ``schedules.get_schedule``).
    cfg_scale: s in logits = (1 + s) * cond - s * uncond (>= 0; 0 skips the unconditional pass).
    temperature: >= 0. ``'constant'`` (Lumina-DiMOO): tokens are drawn from
      softmax(logits / temperature) and the MaskGIT remasking noise is temperature * Gumbel; it
      must then be > 0. ``'mmada_annealed'`` (MMaDA): tokens are drawn from softmax(logits) and
      the remasking noise scale decays cumulatively, tau_s = temperature * prod_{j<=s}(1-(j+1)/T)
      (MMaDA's in-loop ``temperature *= 1 - ratio``); with ``'emerge'`` the temperature then has no
      effect, as in MaskGRPO, whose emerge sampler ignores it.
    temperature_mode: ``'constant'`` or ``'mmada_annealed'``.
    cache: the rollout cache, ``CacheConfig`` (off by default); a mapping is converted.
    spread: ``'maskgit'`` only, >= 0. 0 (default): MaskGIT's choice, the most confident slots.
      r > 0: the same counts and confidence order, but a slot within Chebyshev distance r of one
      already chosen this step, on the square token grid, is taken only when no farther slot is
      left. Slots drawn in one step are sampled independently; neighbours on an image grid mostly
      belong to one object, so two of them drawn at once can disagree (a shape in two colours).
      Spreading a step's commits apart keeps those decisions sequential, at no extra forward
      (docs/findings.md, section 19).
  """

  num_steps: int = 12
  sketch_steps: int = 4
  rule: str = "maskgit"
  schedule: str = "cosine"
  cfg_scale: float = 0.0
  temperature: float = 1.0
  temperature_mode: str = "constant"
  cache: CacheConfig = CacheConfig()
  spread: int = 0

  def __post_init__(self):
    def fail(field, msg):
      raise ValueError(f"SamplerConfig.{field}: {msg}")

    for f in ("num_steps", "sketch_steps", "spread"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        fail(f, f"must be an int, got {v!r}")
    if self.num_steps < 1:
      fail("num_steps", f"must be >= 1, got {self.num_steps}")
    if not 0 < self.sketch_steps <= self.num_steps:
      fail(
          "sketch_steps", f"must satisfy 0 < sketch_steps <= num_steps = {self.num_steps}, " f"got {self.sketch_steps}"
      )
    if self.rule not in RULES:
      fail("rule", f"unknown {self.rule!r}; choose from {RULES}")
    if self.spread < 0:
      fail("spread", f"must be >= 0, got {self.spread}")
    if self.spread and self.rule != "maskgit":
      fail("spread", f"spreads MaskGIT's commits; rule={self.rule!r} commits at random (use spread=0)")
    if self.temperature_mode not in TEMPERATURE_MODES:
      fail("temperature_mode", f"unknown {self.temperature_mode!r}; choose from {TEMPERATURE_MODES}")
    for f in ("cfg_scale", "temperature"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        fail(f, f"must be a number, got {v!r}")
      if not (math.isfinite(v) and v >= 0):
        fail(f, f"must be finite and >= 0, got {v}")
    if self.temperature_mode == "constant" and self.temperature <= 0:
      fail(
          "temperature",
          "must be > 0 with temperature_mode='constant' (tokens are drawn from " "softmax(logits / temperature))",
      )
    if not isinstance(self.schedule, str):
      fail("schedule", f"must be a string, got {self.schedule!r}")
    g = schedules.masked_fractions(self.schedule, self.num_steps)  # raises on unknown names
    if np.any(np.diff(g) > 1e-12) or np.any(g < 0) or np.any(g > 1):
      fail("schedule", f"{self.schedule!r} is not non-increasing within [0, 1]")
    if not isinstance(self.cache, CacheConfig) and hasattr(self.cache, "keys"):  # dict, ConfigDict
      object.__setattr__(self, "cache", CacheConfig.from_mapping({k: self.cache[k] for k in self.cache.keys()}))
    if not isinstance(self.cache, CacheConfig):
      fail("cache", f"must be a CacheConfig or a mapping of {list(CACHE_KEYS)}, got {self.cache!r}")
    # Normalise numeric types so equal configs hash equally (they key jit caches).
    object.__setattr__(self, "num_steps", int(self.num_steps))
    object.__setattr__(self, "sketch_steps", int(self.sketch_steps))
    object.__setattr__(self, "spread", int(self.spread))
    object.__setattr__(self, "cfg_scale", float(self.cfg_scale))
    object.__setattr__(self, "temperature", float(self.temperature))

  @classmethod
  def from_mapping(cls, m: Mapping[str, Any], ignore: tuple[str, ...] = ("share_sketch",)) -> "SamplerConfig":
    """Builds a config from a dict / ConfigDict; unknown keys (other than ``ignore``) raise."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(m) - names - set(ignore))
    if unknown:
      raise ValueError(f"SamplerConfig: unknown keys {unknown}; valid keys {sorted(names)}")
    return cls(**{k: m[k] for k in m if k in names})

  # ---- static per-step tables (host numpy; closed over as constants by the jitted loops) ----

  @property
  def use_cfg(self) -> bool:
    return self.cfg_scale != 0.0

  @property
  def sample_temperature(self) -> float:
    """Temperature applied to the (CFG'd) logits of the distribution tokens are drawn from."""
    return self.temperature if self.temperature_mode == "constant" else 1.0

  def masked_after(self, num_tokens: int) -> np.ndarray:
    """int32[T]: MaskGIT's count of tokens still masked after step s, for N = num_tokens.

    m_s = clip(floor(N * g((s + 1) / T)), 1, m_{s-1} - 1) as MMaDA's ``mask_len`` (at least one
    commit per step while possible, one slot kept masked until the end), and m_{T-1} = 0: the last
    step commits everything (MMaDA returns the last step's samples, which is the same thing).
    """
    g = schedules.masked_fractions(self.schedule, self.num_steps)
    out = np.zeros(self.num_steps, np.int32)
    prev = num_tokens
    for s in range(self.num_steps - 1):
      # 1e-9 keeps exact products (e.g. linear 0.75 * 64) from flooring one below on round-off.
      m = min(max(int(math.floor(num_tokens * g[s + 1] + 1e-9)), 1), prev - 1)
      out[s] = prev = max(m, 0)
    return out

  def grid_width(self, num_tokens: int) -> int:
    """The side of the square token grid ``spread`` measures distance on (0 when spread is off).

    Raises:
      ValueError: spread > 0 and ``num_tokens`` is not a square.
    """
    if not self.spread:
      return 0
    w = math.isqrt(num_tokens)
    if w * w != num_tokens:
      raise ValueError(f"SamplerConfig.spread: needs a square token grid, got num_tokens={num_tokens}")
    return w

  def noise_scales(self) -> np.ndarray:
    """float32[T]: scale of the Gumbel noise added to log-confidence when choosing commits."""
    t = self.num_steps
    if self.temperature_mode == "constant":
      return np.full(t, self.temperature, np.float32)
    ratio = (np.arange(t) + 1.0) / t
    return (self.temperature * np.cumprod(1.0 - ratio)).astype(np.float32)

  def unmask_probs(self) -> np.ndarray:
    """float32[T]: emerge's per-step probability that a still-masked token unmasks (last = 1)."""
    g = schedules.masked_fractions(self.schedule, self.num_steps)
    a_t, a_s = g[:-1], g[1:]
    # A schedule that reaches 0 early (g_t = 0) has nothing left to unmask: probability 1 is safe.
    p = np.where(a_t > 0, (a_t - a_s) / np.where(a_t > 0, a_t, 1.0), 1.0)
    p[-1] = 1.0
    return np.clip(p, 0.0, 1.0).astype(np.float32)
