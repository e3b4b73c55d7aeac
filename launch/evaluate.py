"""GenEval-style per-tag table of a policy on the held-out prompts of a training config's task.

  python launch/evaluate.py --config=configs/geneval.py                 # the run's latest checkpoint
  python launch/evaluate.py --config=configs/geneval.py --which=base    # the base policy
  python launch/evaluate.py --config=configs/geneval.py --which=40 --samples_per_prompt=4 \
      --config.sampler.cfg_scale=1.0

Writes eval_<which>.md (the table), grid_<which>.png and eval_<which>.json to --out_dir
(default: the config's workdir) and prints the table. On a multi-host slice every worker runs the
same command; other clusters add --coordinator_address, --num_processes and --process_id (as
launch/train.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from htgrpo_jax import runtime  # noqa: E402  (imports nothing heavy: JAX starts in main)

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/geneval.py", "Training config: path.py[:preset].", lock_config=True
)
_WHICH = flags.DEFINE_string("which", "latest", "'base', 'latest' or a checkpoint step.")
_SAMPLES = flags.DEFINE_integer("samples_per_prompt", 1, "Images per prompt.")
_OUT = flags.DEFINE_string("out_dir", None, "Output folder (default: the config's workdir).")
_DISTRIBUTED = runtime.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from htgrpo_jax import trainer
  # multi-process runtime, compilation cache, log level
  runtime.setup_runtime(_CONFIG.value, **_DISTRIBUTED.values())
  out = trainer.evaluate_checkpoint(
      _CONFIG.value, which=_WHICH.value, samples_per_prompt=_SAMPLES.value, out_dir=_OUT.value
  )
  print(out["table"])


if __name__ == "__main__":
  app.run(main)
