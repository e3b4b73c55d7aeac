"""Exports a run's policy as a Hugging Face checkpoint: LoRA adapters merged into the base.

  python launch/export.py --config=configs/mmada_geneval_lora.py --out_dir=/ckpt/mmada_htgrpo \
      --hf_dir=/ckpt/MMaDA-8B-Base                  # copies config.json, tokenizer, modelling code
  python launch/export.py --config=configs/mmada_geneval_lora.py --out_dir=... --step=500 \
      --dtype=bfloat16                              # the released checkpoints' dtype

Reads the run checkpoint's params (a LoRA run: the adapters; the base comes from
``model.checkpoint``), merges W + alpha / rank * A B and writes safetensors shards plus
``model.safetensors.index.json`` in the model's own key layout (``launch/convert_checkpoint.py``
reads it back). Runs on one host; the merged model must fit its devices (or its RAM on a CPU).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config of the run: path.py[:arg].", lock_config=True
)
_OUT = flags.DEFINE_string("out_dir", None, "Folder to write the HF checkpoint to.")
_STEP = flags.DEFINE_integer("step", None, "Run checkpoint step (default: the newest).")
_DTYPE = flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16"], "Tensor dtype (default: the model's param dtype, float32)."
)
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Original HF folder whose non-weight files are copied.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or not _OUT.value:
    raise app.UsageError("--config=<training config> and --out_dir=<folder> are required")
  from htgrpo_jax import export

  try:
    export.export_run(_CONFIG.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value, hf_dir=_HF_DIR.value)
  except ValueError as e:
    sys.exit(f"export.py: {e}")


if __name__ == "__main__":
  app.run(main)
