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
import re
from typing import Any, Callable, Mapping

import numpy as np

from htgrpo_jax.contracts import Registry, RewardFn
from htgrpo_jax.rewards.base import WeightedReward

RewardBuilder = Callable[..., RewardFn]

# ``kind`` -> ``(**options) -> RewardFn``; ``load_rewards()`` holds every family.
REWARDS: Registry[RewardBuilder] = Registry("reward kind")


def load_rewards() -> Registry[RewardBuilder]:
  """``REWARDS`` with every family registered (importing a module registers its builders)."""
  from htgrpo_jax.rewards import flowgrpo, remote  # noqa: F401  ('remote', 'flowgrpo_geneval')
  from htgrpo_jax.rewards import clip, geneval_reward  # noqa: F401  ('clipscore', 'geneval_owl')
  from htgrpo_jax.worlds.shapeeval import reward  # noqa: F401  ('shapeeval')

  return REWARDS


def build_reward(kind: str, options: Mapping[str, Any], key: str, name: str | None = None) -> RewardFn:
  """The reward ``kind`` built with ``options``.

  Args:
    kind: a registered name.
    options: the builder's keyword arguments.
    key: where the entry lives in the config (``rewards.clip``), named by every error.
    name: given to builders that take a ``name`` (used in their errors) unless ``options`` sets it.

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
  named = [
      n
      for n, p in params.items()
      if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  ]
  if not takes_any:
    unknown = sorted(set(options) - set(named))
    if unknown:
      raise ValueError(
          f"{key}.{unknown[0]}: not an option of reward kind {kind!r} (its options: " f"{', '.join(named) or 'none'})"
      )
  if name is not None and "name" in named and "name" not in options:
    options = {**options, "name": name}
  missing = [n for n in named if params[n].default is inspect.Parameter.empty and n not in options]
  if missing:
    raise ValueError(f"{key}.{missing[0]}: required by reward kind {kind!r} (its options: " f"{', '.join(named)})")
  try:
    return builder(**dict(options))
  except ValueError as e:
    raise ValueError(f"{key} (kind {kind!r}): {e}") from None


# Keys of a ``config.rewards`` entry read here; every other key is an option of its builder.
ENTRY_KEYS = ("kind", "weight", "group_norm")
WORLD = "world"  # the kind that stands for the world's own reward (``Task.reward``)


def weighted_from_config(
    entries: Mapping[str, Any], *, world: RewardFn | None, group_size: int, key: str = "rewards"
) -> WeightedReward:
  """The RL reward of a ``config.rewards`` block: ``{name: {kind, weight, group_norm, **options}}``.

  Each entry ``name`` builds reward ``kind`` (default: ``name``; ``'world'`` is the task's own reward
  and takes no options) with its other keys as options; ``weight`` (default 1.0) scales it and
  ``group_norm`` (default False) first normalises it within each prompt's group of
  ``group_size`` images (``base.group_normalize``). ``reward/<name>`` is logged per component.

  Raises:
    ValueError: naming ``rewards.<name>[.<option>]`` for a malformed entry, a bad weight or
      group_norm, an unknown kind or option, or a builder's rejection.
  """
  if not entries:
    raise ValueError(f"{key}: no reward entries")
  components = {}
  for name, entry in entries.items():
    where = f"{key}.{name}"
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", str(name)):
      raise ValueError(
          f"{where}: a reward name must be a letter then letters, digits or '_' (it "
          "names the logged metric reward/<name>)"
      )
    if not hasattr(entry, "items"):
      raise ValueError(f"{where}={entry!r}: must be a dict of kind, weight, group_norm and the " "reward's options")
    entry = dict(entry.items())
    kind = entry.pop("kind", name)
    weight = entry.pop("weight", 1.0)
    norm = entry.pop("group_norm", False)
    if not isinstance(kind, str) or not kind:
      raise ValueError(f"{where}.kind={kind!r}: must be a registered reward name or {WORLD!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight):
      raise ValueError(f"{where}.weight={weight!r}: must be a finite number")
    if not isinstance(norm, bool):
      raise ValueError(f"{where}.group_norm={norm!r}: must be True or False")
    if norm and group_size < 2:
      raise ValueError(f"{where}.group_norm=True needs rl.group_size >= 2, got {group_size}")
    if kind == WORLD:
      if entry:
        raise ValueError(
            f"{where}.{sorted(entry)[0]}: kind 'world' (the world's own reward) takes "
            "no options; set them under world.*"
        )
      if world is None:
        raise ValueError(f"{where}.kind='world': this task has no reward of its own")
      fn = world
    else:
      fn = build_reward(kind, entry, where, name=str(name))
    components[str(name)] = (fn, float(weight), norm)
  return WeightedReward(components, group_size=group_size)
