"""Trains a dMLLM policy with HT-GRPO (or a baseline) from an ml_collections config.

  python launch/train.py --config=configs/geneval.py [--config.key=value ...]

On a multi-host TPU slice every worker runs this same command (see launch/tpu_vm.sh).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/geneval.py", "Training config: path.py[:preset].", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax/TFDS info lines would bury the progress bar
  from htgrpo_jax import trainer  # after flag parsing: a bad --config fails before JAX starts
  trainer.train(_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
