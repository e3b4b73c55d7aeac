"""The ShapeEval verifier as a registered reward (``rewards.registry``, kind ``'shapeeval'``).

Built by the reward server (``launch/reward_server.py --serve=dense=shapeeval,mode=dense``) and by
the config's weighted rewards (``config.rewards.<name>.kind='shapeeval'``).
"""

from __future__ import annotations

from htgrpo_jax.rewards.registry import REWARDS
from htgrpo_jax.worlds.shapeeval.scenes import WorldConfig
from htgrpo_jax.worlds.shapeeval.verifier import ShapeEvalReward, VerifierConfig


@REWARDS.register("shapeeval")
def build_shapeeval(
    mode: str = "dense",
    canvas: int = 32,
    patch: int = 4,
    snap: bool = True,
    on_invalid: str = "raise",
    junk_half_life: float = VerifierConfig.junk_half_life,
) -> ShapeEvalReward:
  """The pixel verifier of the world ``(canvas, patch, snap)``: ``mode`` 'dense' (RL's partial
  score) or 'strict' (GenEval 0/1); ``on_invalid`` 'raise' or 'zero' for prompts outside the
  grammar; ``junk_half_life`` the malformed px that halve the dense score (strict ignores it)."""
  return ShapeEvalReward(
      WorldConfig(canvas=canvas, patch=patch, snap=snap),
      mode=mode,
      on_invalid=on_invalid,
      vcfg=VerifierConfig(junk_half_life=float(junk_half_life)),
  )
