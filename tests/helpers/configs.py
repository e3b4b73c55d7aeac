"""The tiny training config the trainer tests run, under a test's tmp folder."""
import os

from htgrpo_jax import tasks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(root, name, **over):
  """``configs/geneval.py:htgrpo,tiny`` with its world, base and workdir under ``root`` and the
  dotted ``over`` keys (``**{"rl.beta": 0.0}``) set."""
  cfg = tasks.load_config_file(os.path.join(REPO, "configs", "geneval.py"), "htgrpo,tiny")
  cfg.world.data_dir = str(root / "world")
  cfg.model.checkpoint = str(root / "base")
  cfg.workdir = str(root / name)
  cfg.progress = False
  for k, v in over.items():
    node = cfg
    *path, last = k.split(".")
    for part in path:
      node = node[part]
    node[last] = v
  return cfg
