"""Rewards: the protocol, combinators, a remote client and the ShapeEval verifier."""
from htgrpo_jax.rewards.base import RewardFn, check_images, validate_rewards, weighted

__all__ = ["RewardFn", "check_images", "validate_rewards", "weighted"]
