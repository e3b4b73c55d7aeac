"""Config-file helpers that import no JAX (nor anything else heavy): config files use them.

A ``configs/*.py`` file that builds on a sibling (``mmada_geneval.py`` on ``geneval.py``) loads it
with ``load_config_file``; parsing a config must stay cheap and must not initialise JAX, so this
module imports only the standard library (``tests/test_layering.py`` checks it).
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  import ml_collections

__all__ = ["load_config_file"]


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """``get_config([arg])`` of a ``configs/*.py`` file (big_vision style), by path; a relative
  path missing from the working directory is looked up in the source checkout."""
  if not os.path.isfile(path) and not os.path.isabs(path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(repo, path)):
      path = os.path.join(repo, path)
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location("_htgrpo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)
