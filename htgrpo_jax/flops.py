"""Analytic model FLOPs of the LLaDA-style policy: one forward, one sampler call, one RL step.

Matmul FLOPs only (2 per multiply-add), rematerialisation not counted: the "model FLOPs" of MFU
accounting, the number to plan throughput with. XLA's ``compiled.cost_analysis()['flops']`` is no
substitute on the real programs: it counts a while-loop body once, and the scanned layers, the K
inner updates, the micro-batch scan and the sampler's T steps are all loops.

One forward of ``rows`` sequences of L tokens whose hidden states reach the LM head on N slots
restricted to the C codebook rows (``LLaDA(..., select=, head_rows=)``, what the policy runs):

  F = rows * (layers * (8 L D^2 + 4 L^2 D + 6 L D M) + 2 N D C)

per block: q, k, v, o projections 4 x 2 L D^2; q k^T and att v 2 x 2 L^2 D; the gated MLP
3 x 2 L D M. A backward pass costs 2F (the gradient of each matmul's two operands), so an inner
update is 3F. ``tests/test_flops.py`` checks these counts against the dot_generals of the traced
programs (the forward, a whole train step, a whole sampler call), not against this formula.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing this module needs neither JAX nor the models
  from htgrpo_jax.models.layouts import Layout
  from htgrpo_jax.models.llada import LLaDAConfig
  from htgrpo_jax.rl import HTGRPOConfig
  from htgrpo_jax.sampling import SamplerConfig

SAMPLER_PROGRAMS = ("sampler", "sketch", "paint")


def matmul_flops(cfg: "LLaDAConfig", rows: int, length: int, slots: int, codebook: int) -> float:
  """Matmul FLOPs of one forward of ``rows`` sequences of ``length`` tokens with the LM head on
  ``slots`` positions x ``codebook`` rows (the module docstring's F)."""
  d, m = cfg.d_model, cfg.mlp_hidden
  per_layer = 8 * length * d * d + 4 * length * length * d + 6 * length * d * m
  return float(rows) * (cfg.n_layers * per_layer + 2 * slots * d * codebook)


def forward_flops(cfg: "LLaDAConfig", layout: "Layout", rows: int) -> float:
  """``matmul_flops`` of one policy forward (``canvas_logits_fn``) on ``rows`` rows of ``layout``."""
  return matmul_flops(cfg, rows, layout.seq_len, layout.num_image_tokens, layout.codebook_size)


def train_step_passes(rl_cfg: "HTGRPOConfig") -> int:
  """Forward-equivalents of one RL step (``rl.make_train_step``): one old-policy forward per
  distinct estimator canvas (``rl.canvas_groups``: 2 for 'htgrpo' with the structure context, K for
  the other estimators), as many reference forwards when beta > 0, and K forward + backward
  inner updates (3 each)."""
  from htgrpo_jax import rl

  distinct = max(rl.canvas_groups(rl_cfg)) + 1
  return distinct * (2 if rl_cfg.beta > 0 else 1) + 3 * rl_cfg.num_iterations


def train_step_flops(
    cfg: "LLaDAConfig", layout: "Layout", rl_cfg: "HTGRPOConfig", rows: int, guided_rows: int = 1
) -> float:
  """Model FLOPs of one ``rl.make_train_step`` call on ``rows`` rollouts (all chips together).

  ``guided_rows``: 2 when the step scores the CFG-guided logits (``estimator_guidance='guided'``
  with CFG on: every pass runs the conditional and the unconditional rows), else 1. Micro-batching
  does not change the count.
  """
  return train_step_passes(rl_cfg) * forward_flops(cfg, layout, guided_rows * rows)


def sampler_steps(sampler_cfg: "SamplerConfig", program: str = "sampler") -> int:
  """Policy forwards of one sampler call: T for ``sample``, the sketch steps for ``sketch``, the
  rest for ``paint``."""
  if program not in SAMPLER_PROGRAMS:
    raise ValueError(f"program={program!r}: choose from {SAMPLER_PROGRAMS}")
  t, s = sampler_cfg.num_steps, sampler_cfg.sketch_steps
  return {"sampler": t, "sketch": s, "paint": t - s}[program]


def sampler_flops(
    cfg: "LLaDAConfig", layout: "Layout", sampler_cfg: "SamplerConfig", rows: int, program: str = "sampler"
) -> float:
  """Model FLOPs of one sampler call on ``rows`` rows (all chips): one forward per step, on 2 x rows
  when CFG is on (conditional and unconditional rows in one batch)."""
  cfg_rows = 2 if sampler_cfg.use_cfg else 1
  return sampler_steps(sampler_cfg, program) * forward_flops(cfg, layout, cfg_rows * rows)
