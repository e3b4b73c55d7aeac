"""Converts an HF LLaDA checkpoint (MMaDA-8B / Lumina-DiMOO) into an Orbax params checkpoint.

  python launch/convert_checkpoint.py --hf_dir=/ckpt/MMaDA-8B-Base --out_dir=/ckpt/mmada_params \
      --preset=mmada_8b [--fsdp=16 --tensor=4] [--override=scan_layers=False]

On a TPU pod run it on every host (``jax.distributed`` is initialised when the environment says
multi-host); each host reads the tensors and keeps only its devices' shards. No torch needed: the
safetensors shards (BF16 included) are read with numpy and ml_dtypes (``[train]`` extra).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from htgrpo_jax import parallel  # noqa: E402
from htgrpo_jax.models import convert, llada  # noqa: E402

_HF = flags.DEFINE_string("hf_dir", None, "HF checkpoint dir (model.safetensors.index.json + shards)")
_OUT = flags.DEFINE_string("out_dir", None, "Orbax checkpoint dir to create")
_PRESET = flags.DEFINE_enum("preset", "mmada_8b", sorted(llada.PRESETS), "model preset")
_FSDP = flags.DEFINE_integer("fsdp", -1, "fsdp mesh size (-1: all devices left after tensor)")
_TENSOR = flags.DEFINE_integer("tensor", 1, "tensor mesh size")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "preset override key=value (int/float/bool/str)")


def _parse(value: str):
  for cast in (int, float):
    try:
      return cast(value)
    except ValueError:
      pass
  return {"true": True, "false": False, "none": None}.get(value.lower(), value)


def main(argv):
  del argv
  parallel.maybe_initialize_distributed()
  overrides = {}
  for item in _OVERRIDES.value:
    if "=" not in item:
      raise ValueError(f"--override {item!r} must be key=value")
    key, value = item.split("=", 1)
    overrides[key] = _parse(value)
  config = llada.get_config(_PRESET.value, **overrides)
  mesh = parallel.make_mesh(data=1, fsdp=_FSDP.value, tensor=_TENSOR.value)
  convert.convert_checkpoint(_HF.value, _OUT.value, config, mesh=mesh, progress=True)
  print(f"wrote {_OUT.value} ({config.num_params() / 1e9:.3f}B params, {_PRESET.value})")


if __name__ == "__main__":
  flags.mark_flags_as_required(["hf_dir", "out_dir"])
  app.run(main)
