"""HT-GRPO, model-agnostic and pure-functional: ``from htgrpo_jax import rl; rl.make_train_step(...)``.

The policy enters only as ``canvas_logits_fn(params, prompt_tokens, canvas) -> logits[B, N, C]`` (the
``CanvasLogitsFn`` contract). The shared types (``MASK``, ``CanvasLogitsFn``, ``Rollout``, ``TrainState``)
live in ``htgrpo_jax/contracts.py`` and are re-exported here; rl/ imports only them and ``parallel.py``,
nothing of the models, the samplers, the data or the trainer.
"""

from htgrpo_jax.contracts import MASK, CanvasLogitsFn, Rollout, TrainState
from htgrpo_jax.rl.advantages import group_advantages, hierarchical_advantages, token_advantages
from htgrpo_jax.rl.config import (
    CREDIT_NORMALIZATIONS,
    ESTIMATOR_GUIDANCE,
    ESTIMATORS,
    PARTITION_MODES,
    PRESETS,
    STAGE_GLOBAL,
    STAGE_NAMES,
    STAGE_REFINE,
    STAGE_STRUCT,
    HTGRPOConfig,
    preset,
)
from htgrpo_jax.rl.estimators import all_canvases, canvas_groups, iteration_canvas, replay_weights
from htgrpo_jax.rl.hierarchy import (
    credit_weights,
    loss_set_credit,
    partition_tokens,
    sample_update_set,
    stage_candidates,
    stage_of_iteration,
    stage_schedule,
    update_fractions,
)
from htgrpo_jax.rl.loss import combine_metrics, finalize_metrics, ht_grpo_loss, token_logp_entropy
from htgrpo_jax.rl.supervised import SupervisedBatch, mask_canvas, masked_token_nll
from htgrpo_jax.rl.train_step import (TrainStep, behaviour_gap, make_optimizer, make_train_step, rollout_shardings)

__all__ = [
    "CREDIT_NORMALIZATIONS",
    "ESTIMATORS",
    "ESTIMATOR_GUIDANCE",
    "MASK",
    "PARTITION_MODES",
    "PRESETS",
    "STAGE_GLOBAL",
    "STAGE_NAMES",
    "STAGE_REFINE",
    "STAGE_STRUCT",
    "CanvasLogitsFn",
    "HTGRPOConfig",
    "Rollout",
    "SupervisedBatch",
    "TrainState",
    "TrainStep",
    "all_canvases",
    "behaviour_gap",
    "canvas_groups",
    "combine_metrics",
    "credit_weights",
    "finalize_metrics",
    "group_advantages",
    "hierarchical_advantages",
    "ht_grpo_loss",
    "iteration_canvas",
    "loss_set_credit",
    "make_optimizer",
    "mask_canvas",
    "masked_token_nll",
    "make_train_step",
    "partition_tokens",
    "preset",
    "replay_weights",
    "rollout_shardings",
    "sample_update_set",
    "stage_candidates",
    "stage_of_iteration",
    "stage_schedule",
    "token_advantages",
    "token_logp_entropy",
    "update_fractions",
]
