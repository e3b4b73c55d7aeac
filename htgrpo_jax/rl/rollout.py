"""The rollout record, the canvas convention and the policy contract, as the update sees them.

They live in ``htgrpo_jax/contracts.py`` (the package's lowest layer, shared by the samplers, the
models, the data and the rewards); this module re-exports them so ``rl.rollout.Rollout``,
``rl.rollout.MASK`` and ``rl.rollout.CanvasLogitsFn`` keep naming the same objects.
"""

from htgrpo_jax.contracts import MASK, CanvasLogitsFn, Rollout

__all__ = ["MASK", "CanvasLogitsFn", "Rollout"]
