"""Scores a policy (the base, or a run checkpoint) on its task's held-out prompts, GenEval-style.

``evaluate_checkpoint`` is what ``launch/evaluate.py`` and the study run. A run checkpoint holds the
whole train state (params, optimizer moments, reference params); an evaluation reads the params
only (``restore_params``: an Orbax partial restore), so it needs a third of the memory a resume
would, and checks them against the checkpoint's manifest (shapes, dtypes, checksums) like a
resume does. The params restore onto whatever mesh this process has: a checkpoint written by
several processes and devices evaluates on one.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import orbax.checkpoint as ocp

from htgrpo_jax import evaluate, parallel, paths, rollouts, tasks, writer
from htgrpo_jax.contracts import Adapted
from htgrpo_jax.checkpoint import (CheckpointMismatchError, CorruptCheckpointError, leaf_checksums, step_dirs)
from htgrpo_jax.models import policy
from htgrpo_jax.run_config import check_mesh, eval_key, plan
from htgrpo_jax.sampling import make_sampler

_PARAMS = ".params"  # the params' key path inside the checkpointed TrainState


def restore_params(directory: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
  """The params of run checkpoint ``step`` (None: the newest) laid out as ``abstract_params``.

  Args:
    directory: a run's ``checkpoints/`` folder (``checkpoint.RunCheckpointer``'s layout).
    abstract_params: ``ShapeDtypeStruct`` leaves with the target shardings.
    step: the step to read; None: the newest committed one.

  Returns:
    (params, the step read).

  Raises:
    ValueError: no checkpoint (or not that step) under ``directory``.
    CheckpointMismatchError: the checkpoint's params differ in shape/dtype from
      ``abstract_params`` (another model), naming the leaf.
    CorruptCheckpointError: a params leaf reads back different from what was written.
  """
  directory = paths.resolve(directory)  # a URL (gs://...) stays a URL
  steps = step_dirs(directory)
  if not steps:
    raise ValueError(f"no run checkpoint under {directory}; use which='base'")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise ValueError(f"no checkpoint step {step} under {directory} (steps: {steps})")
  step_dir = paths.join(directory, str(step))
  manifest = None
  if paths.isdir(paths.join(step_dir, "manifest")):
    try:
      manifest = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
          paths.join(step_dir, "manifest"), args=ocp.args.JsonRestore()
      )["leaves"]
    except Exception as e:  # noqa: BLE001 (any failure to read it is corruption)
      raise CorruptCheckpointError(
          step, paths.join(step_dir, "manifest"), f"unreadable manifest ({type(e).__name__}: {e})"
      ) from None
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    for path, leaf in flat:
      key = _PARAMS + jax.tree_util.keystr(path)
      have = manifest.get(key)
      want = dict(shape=list(leaf.shape), dtype=str(leaf.dtype))
      if have is None or (list(have["shape"]), have["dtype"]) != (want["shape"], want["dtype"]):
        raise CheckpointMismatchError(
            f"checkpoint {directory} step {step} does not match this model: leaf {key} is "
            f"{'absent' if have is None else (have['shape'], have['dtype'])} in the checkpoint, "
            f"{(want['shape'], want['dtype'])} here"
        )
  target = {"params": abstract_params}
  params = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
      paths.join(step_dir, "state"),
      args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
      ),
  )["params"]
  if manifest is not None:
    wrong = [k for k, v in leaf_checksums(params).items() if v != manifest[_PARAMS + k]["checksum"]]
    if wrong:
      raise CorruptCheckpointError(
          step,
          paths.join(step_dir, "state"),
          f"leaf {_PARAMS}{wrong[0]} reads back different from what was " "written (checksum mismatch)",
      )
  return params, step


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    *,
    which: str = "latest",
    samples_per_prompt: int = 1,
    out_dir: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Scores a policy on the task's held-out prompts, GenEval-style.

  Every process of a multi-process job runs this; process 0 scores the images (the judge / remote
  scorer sees one request per batch) and writes the reports.

  Args:
    config: the training config (task, sampler, eval settings).
    which: 'base' (the pretrained / converted base params), 'latest' (the newest run checkpoint
      under ``config.workdir``) or a step number.
    samples_per_prompt: images per prompt (GenEval uses 4).
    out_dir: where the table (``eval_<which>.md``), grid and JSON go; default ``config.workdir``.

  Returns:
    dict with ``scores`` (per tag + overall), ``table`` (Markdown), ``strict`` float32[P*G],
    ``params`` (the evaluated params, on this process's mesh) and ``name`` ('base' or 'stepN').
  """
  p = plan(config)
  parallel.maybe_initialize_distributed()
  log = writer.primary_log(log)
  mesh = parallel.make_mesh(**dict(config.mesh))
  check_mesh(p, mesh)
  task = tasks.build_task(config, log=log)
  layout = task.layout
  abstract_params = policy.abstract_params(task.model_cfg, layout, mesh)
  lora = task.model_cfg.lora is not None
  if which == "base":
    params = task.load_base_params(abstract_params)
  else:
    # A LoRA run's checkpoints hold the adapters; the frozen base comes from its own checkpoint.
    abstract = policy.abstract_adapters(task.model_cfg, layout, mesh) if lora else abstract_params
    params, step = restore_params(
        paths.join(paths.resolve(config.workdir), "checkpoints"), abstract, None if which == "latest" else int(which)
    )
    if lora:
      params = Adapted(task.load_base_params(abstract_params), params)
    which = f"step{step}"
  logits_fn = policy.make_canvas_logits_fn(task.model_cfg, layout)
  sampler = make_sampler(
      logits_fn,
      p.sampler,
      num_tokens=layout.num_image_tokens,
      mesh=mesh,
      cached_logits=policy.make_cached_logits(task.model_cfg, layout),
  )
  decode = rollouts.jit_decode(task, mesh)
  score, judge = rollouts.scorers_once(task.score, task.judge)
  res = evaluate.evaluate_policy(
      sampler,
      params,
      layout,
      decode,
      task.eval_prompts,
      eval_key(config),
      score=score,
      samples_per_prompt=samples_per_prompt,
      batch_size=p.eval_batch_size,
      judge=judge,
  )
  out_dir = paths.resolve(out_dir or config.workdir)
  table = writer.write_eval(out_dir, which, res, f"{task.name} held-out, {which}", config.eval.grid_size)
  writer.write_json(
      paths.join(out_dir, f"eval_{which}.json"),
      dict(scores=res["scores"], sampler=str(p.sampler), samples_per_prompt=samples_per_prompt),
  )
  return dict(scores=res["scores"], table=table, strict=res["strict"], params=params, name=which)
