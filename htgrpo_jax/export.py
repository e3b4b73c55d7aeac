"""A run's policy as a Hugging Face checkpoint: LoRA adapters merged into the base, HF safetensors.

``export_run(config, out_dir)`` is what ``launch/export.py`` runs. It reads the run checkpoint's
params only (``evaluate_run.restore_params``: the adapters of a LoRA run, the whole params of a
full fine-tuning run), the frozen base from ``model.checkpoint`` (a LoRA run's checkpoints never
hold it), folds each adapter in (``W + alpha / rank * A B``, ``models.lora.merge``) and writes the
result in the model's own key layout (``models.convert.save_hf``: the inverse of the converter),
so ``launch/convert_checkpoint.py`` (or ``transformers`` with the original modelling code, when
``hf_dir`` supplies it) reads it back.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from htgrpo_jax import aot, parallel, paths
from htgrpo_jax.evaluate_run import restore_params
from htgrpo_jax.models import convert, lora, policy
from htgrpo_jax.run_config import plan


def merged_params(model_cfg, base: Any, adapters: Any, shardings: Any = None) -> Any:
  """``base`` with ``adapters`` folded in (fp32 sums, cast to the base's dtype), on ``shardings``."""
  fold = lambda b, a: lora.merge(model_cfg.lora, b, a)
  return jax.jit(fold, out_shardings=shardings)(base, adapters)


def export_run(
    config: ml_collections.ConfigDict,
    out_dir: str,
    *,
    step: int | None = None,
    dtype: str | None = None,
    hf_dir: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Writes the policy of run checkpoint ``step`` (None: the newest) as HF safetensors.

  Args:
    config: the run's training config (``workdir``, ``model.*``, ``mesh``).
    out_dir: the folder to write (created; shards + ``model.safetensors.index.json``).
    dtype: the tensors' dtype ('float32', 'bfloat16'; None: the model's param dtype).
    hf_dir: the original HF folder, whose other files (``config.json``, tokenizer, modelling code)
      are copied beside the weights so the export loads like the original.

  Returns:
    dict with ``params`` (merged, on this process's devices), ``step`` and ``files``.

  Raises:
    ValueError: a config that is not an HF LLaDA model (``world.kind``), several processes, or the
      run checkpoint's errors (``restore_params``).
  """
  plan(config)
  if config.world.kind != "t2i":
    raise ValueError(
        f"world.kind={config.world.kind!r}: export writes HF LLaDA checkpoints (MMaDA / "
        "Lumina-DiMOO, world.kind='t2i'); the ShapeEval policy has no HF layout"
    )
  if jax.process_count() > 1:
    raise ValueError("export runs on one process (the merged params restore onto its devices)")
  mesh = parallel.make_mesh(**dict(config.mesh))
  model_cfg, layout, _ = aot.build_model(config, log=log)
  abstract_base = policy.abstract_params(model_cfg, layout, mesh)
  ckpts = paths.join(paths.resolve(config.workdir), "checkpoints")
  if model_cfg.lora is None:
    params, step = restore_params(ckpts, abstract_base, step)
  else:
    adapters, step = restore_params(ckpts, policy.abstract_adapters(model_cfg, layout, mesh), step)
    base = convert.restore_params(paths.resolve(config.model.checkpoint), abstract_base)
    params = merged_params(model_cfg, base, adapters, policy.param_shardings(model_cfg, layout, mesh))
    del base
  files = convert.save_hf(params, model_cfg, out_dir, dtype=np.dtype(dtype) if dtype else None)
  if hf_dir:
    for name in sorted(os.listdir(hf_dir)):
      src = os.path.join(hf_dir, name)
      if os.path.isfile(src) and not name.endswith(".safetensors") and name != convert.INDEX_FILE:
        shutil.copy2(src, os.path.join(out_dir, name))
  log(
      f"wrote {out_dir}: step {step} of {config.workdir}"
      + (f", LoRA r={model_cfg.lora.rank} merged" if model_cfg.lora else "")
      + f", {len(files)} shard(s)"
  )
  return dict(params=params, step=step, files=files)
