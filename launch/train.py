"""Trains a dMLLM policy with HT-GRPO (or a baseline) from an ml_collections config.

  python launch/train.py --config=configs/geneval.py [--config.key=value ...]
  python launch/train.py --config=configs/geneval.py:htgrpo,tiny --config.log_level=warning \
      --config.compilation_cache_dir=/tmp/jax_cache --config.profile_steps=2,3

On a multi-host TPU slice every worker runs this same command (see launch/tpu_vm.sh); the
multi-process runtime, the compilation cache and the log level are set up first
(htgrpo_jax/runtime.py). JAX finds a Cloud TPU slice's (and GKE's, SLURM's, Open MPI's) processes
by itself; on any other cluster every host names the coordinator, e.g. on host 1 of 2:

  python launch/train.py --config=configs/mmada_geneval.py --coordinator_address=10.0.0.2:8476 \
      --num_processes=2 --process_id=1

Exit status: 0 when the run reached config.total_steps; 143 (128 + SIGTERM) when a SIGTERM or a
TPU preemption notice stopped it after saving its last step, 130 after SIGINT (Ctrl-C): the run is
not done, and the same command resumes it. A supervisor that restarts failed commands (a JobSet's
restart policy, systemd's Restart=on-failure, a shell loop rerunning the command until it exits 0)
therefore resumes a stopped run and leaves a finished one alone.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from htgrpo_jax import runtime  # noqa: E402  (imports nothing heavy: JAX starts in main)

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/geneval.py", "Training config: path.py[:preset].", lock_config=True
)
_DISTRIBUTED = runtime.define_distributed_flags()  # an explicit multi-process setup (other clusters)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from htgrpo_jax import trainer  # after flag parsing: a bad --config fails before JAX starts

  runtime.setup_runtime(_CONFIG.value, **_DISTRIBUTED.values())
  out = trainer.train(_CONFIG.value)
  return trainer.exit_status(out["interrupted"])  # absl's app.run exits with main's return value


if __name__ == "__main__":
  app.run(main)
