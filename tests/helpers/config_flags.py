"""The config a launch script gets from its command line, parsed in-process by the real flags."""

import sys

from absl import flags
from ml_collections import config_flags


def parse(argv: list[str]):
  """The config ``launch/train.py`` would get from ``argv``. config_flags defines the override
  flags from the ``--config`` file it finds in ``sys.argv``, so the parse sees a real argv."""
  argv = ["launch/train.py", *argv]
  saved, sys.argv = sys.argv, argv
  try:
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", "configs/geneval.py", flag_values=fv)
    fv(argv)
    return holder.value
  finally:
    sys.argv = saved
