"""Mask schedules and the jitted sketch/paint samplers (MaskGIT and emerge rules, CFG, trajectory record)."""

from htgrpo_jax.sampling.config import RULES, TEMPERATURE_MODES, CacheConfig, SamplerConfig
from htgrpo_jax.sampling.sampler import (
    UNCOMMITTED,
    CanvasState,
    SampleRecord,
    Sampler,
    guided_canvas_logits_fn,
    guided_logits,
    make_sampler,
    replay_commit_stats,
    trajectory_canvas,
)
from htgrpo_jax.sampling.schedules import get_schedule, masked_fractions

__all__ = [
    "RULES",
    "TEMPERATURE_MODES",
    "CacheConfig",
    "SamplerConfig",
    "UNCOMMITTED",
    "CanvasState",
    "SampleRecord",
    "Sampler",
    "guided_canvas_logits_fn",
    "guided_logits",
    "make_sampler",
    "replay_commit_stats",
    "trajectory_canvas",
    "get_schedule",
    "masked_fractions",
]
