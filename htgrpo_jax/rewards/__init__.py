"""Rewards: the protocol, combinators, the registry, remote clients and the ShapeEval verifier."""

from htgrpo_jax.rewards.base import (
    RewardError,
    RewardFn,
    WeightedReward,
    as_weighted,
    check_images,
    group_normalize,
    validate_rewards,
    weighted,
)

__all__ = [
    "RewardError",
    "RewardFn",
    "WeightedReward",
    "as_weighted",
    "check_images",
    "group_normalize",
    "validate_rewards",
    "weighted",
]
