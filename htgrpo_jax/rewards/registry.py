"""Rewards by name: builders registered in ``REWARDS``, built from keyword options.

A builder is ``(**options) -> RewardFn``; each reward family registers its builders where it is
defined::

  @REWARDS.register("clipscore")
  def build_clipscore(checkpoint: str, scale: float = 2.5) -> RewardFn: ...

``load_rewards()`` imports the modules that register (one line per family, like
``tasks.load_worlds``), so the config and the reward server see every reward without this module
importing a world or a model at load time. ``build_reward(kind, options, key)`` checks the options
against the builder's signature first, so an unknown or missing option fails naming the config key
(``rewards.clip.checkpoint``) and the options the builder takes, before anything is built.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from htgrpo_jax.contracts import Registry, RewardFn

RewardBuilder = Callable[..., RewardFn]

# ``kind`` -> ``(**options) -> RewardFn``; ``load_rewards()`` holds every family.
REWARDS: Registry[RewardBuilder] = Registry("reward kind")


def load_rewards() -> Registry[RewardBuilder]:
  """``REWARDS`` with every family registered (importing a module registers its builders)."""
  from htgrpo_jax.rewards import flowgrpo, remote  # noqa: F401  ('remote', 'flowgrpo_geneval')
  from htgrpo_jax.worlds.shapeeval import reward  # noqa: F401  ('shapeeval')
  return REWARDS


def build_reward(kind: str, options: Mapping[str, Any], key: str) -> RewardFn:
  """The reward ``kind`` built with ``options``.

  Args:
    kind: a registered name.
    options: the builder's keyword arguments.
    key: where the entry lives in the config (``rewards.clip``), named by every error.

  Raises:
    ValueError: an unknown kind (naming the known ones), an option the builder does not take or
      a required one missing (naming ``key.option`` and the builder's options), or the builder's
      own ValueError (prefixed with ``key``).
  """
  registry = load_rewards()
  if kind not in registry:
    raise ValueError(f"{key}.kind={kind!r} must be one of {registry.names()}")
  builder = registry.get(kind)
  params = inspect.signature(builder).parameters
  takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
  named = [n for n, p in params.items()
           if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
  if not takes_any:
    unknown = sorted(set(options) - set(named))
    if unknown:
      raise ValueError(f"{key}.{unknown[0]}: not an option of reward kind {kind!r} (its options: "
                       f"{', '.join(named) or 'none'})")
  missing = [n for n in named if params[n].default is inspect.Parameter.empty and n not in options]
  if missing:
    raise ValueError(f"{key}.{missing[0]}: required by reward kind {kind!r} (its options: "
                     f"{', '.join(named)})")
  try:
    return builder(**dict(options))
  except ValueError as e:
    raise ValueError(f"{key} (kind {kind!r}): {e}") from None
