"""AOT pre-flight for TPU pods: compile a training config's programs for a slice, on a CPU box.

libtpu describes any TPU slice (``jax.experimental.topologies``) without the hardware, so the real
sharded programs of a training config can be lowered and compiled here on abstract inputs
(``jax.ShapeDtypeStruct`` with ``NamedSharding``s; nothing is allocated) and XLA:TPU reports what
each chip would hold:

  target = aot.prepare(config, "v5p:4x4x4")      # the trainer's plan, mesh, optimizer and state
  report = aot.compile_program(target, "train_step")
  report.total_gib, report.fits, report.model_tflops, report.compile_s

Everything that fixes the programs comes from the training config through the trainer's own
functions in ``htgrpo_jax.run_config`` (the trainer module itself is not imported): ``plan``
(batch, micro-batch, RL and sampler settings, validated), ``parallel.make_mesh`` on the
topology's chips with ``config.mesh``, ``check_mesh``, ``make_optimizer``,
``abstract_train_state`` / ``state_shardings``. What the trainer gets from files (weights, the
tokenizer, a built world) is replaced here by shapes: ``build_model`` gives the task's model and
layout without them (``MODEL_BUILDERS``: one entry per ``world.kind``, as ``tasks.WORLDS``).

Per-device memory is ``compiled.memory_analysis()``: arguments + outputs - donated aliases + temps +
generated code (the peak XLA plans for; the runtime adds a little for its own buffers). FLOPs:
``model_flops`` is the analytic count of ``htgrpo_jax.flops`` per device; ``xla_flops`` is
``cost_analysis()['flops']`` per device, which counts every loop body once (see ``flops``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from htgrpo_jax import flops, parallel, paths, rl
from htgrpo_jax.contracts import Registry
from htgrpo_jax.models import layouts, llada, lora, policy

# The trainer's own validation and state construction, without the trainer module (its loop,
# writers and checkpointing are no part of a pre-flight).
from htgrpo_jax.run_config import Plan, abstract_train_state, check_mesh, make_optimizer, plan
from htgrpo_jax.sampling import guided_canvas_logits_fn, make_sampler
from htgrpo_jax.sampling.sampler import CanvasState

# HBM per chip in GiB, by ``device_kind`` (the names libtpu's topology descriptions use).
HBM_GIB: dict[str, float] = {
    "TPU v4": 32.0,
    "TPU v5": 95.0,  # v5p
    "TPU v5p": 95.0,
    "TPU v5 lite": 16.0,  # v5e
    "TPU v5e": 16.0,
    "TPU v6 lite": 32.0,  # v6e (Trillium)
    "TPU v6e": 32.0,
}

# 'sampler': the rollout sampler's ``sample``; 'sketch' / 'paint': its two halves (share_sketch).
PROGRAMS = ("sampler", "sketch", "paint", "train_step")


@dataclasses.dataclass(frozen=True)
class Target:
  """A training config made concrete for one TPU slice: what the trainer would build before its
  first step, with shapes in place of weights and data.

  Attributes:
    topology: the libtpu topology name, e.g. 'v5p:4x4x4'.
    plan: ``run_config.plan(config)``.
    model_cfg, layout: the task's backbone and sequence layout (``build_model``).
    mesh: ``parallel.make_mesh(**config.mesh)`` over the topology's chips.
    optimizer: ``run_config.make_optimizer(config, plan)``.
    tokenizer_note: set when the config's tokenizer was not on this machine and a stand-in was
      used (program shapes do not depend on the text vocabulary).
  """

  topology: str
  plan: Plan
  model_cfg: llada.LLaDAConfig
  layout: layouts.Layout
  mesh: Mesh
  optimizer: Any
  tokenizer_note: str | None = None


@dataclasses.dataclass(frozen=True)
class ProgramReport:
  """What one compiled program needs per device.

  Attributes:
    program: one of ``PROGRAMS``.
    rows: batch rows of the program's input (B; the sketch rows for a shared sketch).
    argument_bytes, output_bytes, alias_bytes, temp_bytes, code_bytes: ``memory_analysis()``.
    xla_flops: ``cost_analysis()['flops']`` per device (loop bodies counted once).
    model_flops: analytic matmul FLOPs per device per call (``htgrpo_jax.flops``).
    compile_s: seconds to lower + compile.
    hbm_gib: HBM of one chip (nan when the kind is not in ``HBM_GIB``).
    device_kind: e.g. 'TPU v5'.
  """

  program: str
  rows: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  xla_flops: float
  model_flops: float
  compile_s: float
  hbm_gib: float
  device_kind: str

  @property
  def total_bytes(self) -> int:
    # Donated inputs share buffers with the outputs they alias, so count them once.
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

  @property
  def total_gib(self) -> float:
    return self.total_bytes / 2**30

  @property
  def fits(self) -> bool:
    return bool(self.total_gib <= self.hbm_gib)

  @property
  def model_tflops(self) -> float:
    return self.model_flops / 1e12


# ----------------------------------------------------------------------------------------------
# The slice, the model and the target.


def topology_devices(topology: str) -> np.ndarray:
  """The devices of a libtpu topology description (object array, one per chip).

  Raises:
    ValueError: libtpu is missing or does not know ``topology`` (names the flag).
  """
  # Several AOT processes may share a build box; without this libtpu's lockfile fails the second.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not isinstance(topology, str) or ":" not in topology:
    raise ValueError(f"topology={topology!r}: expected '<kind>:<shape>', e.g. 'v5p:4x4x4' or 'v5e:16x16'")
  from jax.experimental import topologies

  try:
    return np.array(topologies.get_topology_desc(topology, "tpu").devices)
  except Exception as e:  # libtpu raises XlaRuntimeError / RuntimeError with its own text
    raise ValueError(
        f"topology={topology!r}: libtpu cannot describe it ({str(e).splitlines()[0]}); "
        "use e.g. 'v5p:4x4x4', 'v5e:2x2', 'v5e:16x16', 'v6e:4x4'"
    ) from None


def stand_in_tokenizer() -> str:
  """A directory holding the ShapeEval word tokenizer (``worlds.shapeeval.text_tokenizer``), for
  layouts whose real tokenizer is not on this machine: the MMaDA / DiMOO layouts' sizes and special
  ids are fixed, only the text ids of an encoded prompt come from the tokenizer."""
  from htgrpo_jax.worlds.shapeeval import text_tokenizer

  path = tempfile.mkdtemp(prefix="aot_tokenizer_")
  text_tokenizer.save_tokenizer(text_tokenizer.build_tokenizer(), path)
  return path


# ``world.kind`` -> ``(config, *, log) -> (model config, layout, tokenizer note)``: a task's
# model and layout from its config alone (``tasks.WORLDS`` builds the whole task from files).
MODEL_BUILDERS: Registry[Callable[..., tuple[llada.LLaDAConfig, layouts.Layout, str | None]]] = Registry("world.kind")


def build_model(
    config: ml_collections.ConfigDict, *, log: Callable[[str], None] = print
) -> tuple[llada.LLaDAConfig, layouts.Layout, str | None]:
  """(model config, layout, tokenizer note) of ``config``'s task, without weights or data: the
  ``MODEL_BUILDERS`` entry of ``world.kind``.

  ``world.kind='shapes'``: ``pretrain.build_policy`` on the world's tokenizer and an abstract
  codebook of ``world.num_codes`` codes (no world is built, no base policy pretrained).
  ``world.kind='t2i'``: ``tasks.build_layout`` and ``model.preset`` with ``model.overrides``, as
  ``tasks.build_t2i_task``; a missing ``model.tokenizer`` directory is replaced by a stand-in
  (the note says so).

  Raises:
    ValueError: naming the config key (unknown world kind, layout, preset; a model that cannot
      serve the layout).
  """
  return MODEL_BUILDERS.get(config.world.kind)(config, log=log)


@MODEL_BUILDERS.register("shapes")
def _shapes_model(
    config: ml_collections.ConfigDict, *, log: Callable[[str], None] = print
) -> tuple[llada.LLaDAConfig, layouts.Layout, None]:
  from htgrpo_jax import pretrain
  from htgrpo_jax.worlds.shapeeval import dataset as world_data
  from htgrpo_jax.worlds.shapeeval import grammar, text_tokenizer
  from htgrpo_jax.worlds.shapeeval.task import pretrain_config

  pcfg = pretrain_config(config)
  world = pretrain.world_config(pcfg)
  codes = jax.ShapeDtypeStruct((config.world.num_codes, world.patch * world.patch * 3), jnp.float32)
  assets = world_data.WorldAssets(
      data_dir=config.world.data_dir,
      codebook=codes,
      builder=None,
      tokenizer=text_tokenizer.build_tokenizer(grammar.vocabulary(world)),
  )
  model_cfg, layout = pretrain.build_policy(pcfg, assets)
  return lora.attach(model_cfg, config.model), layout, None


def _tokenizer_present(path: str) -> bool:
  """Whether the tokenizer folder exists (a URL that cannot be reached from here counts as absent:
  the pre-flight then uses the stand-in and says so)."""
  try:
    return bool(path) and paths.isdir(path)
  except Exception:  # noqa: BLE001 - e.g. no GCS backend or no credentials on this machine
    return False


@MODEL_BUILDERS.register("t2i")
def _t2i_model(
    config: ml_collections.ConfigDict, *, log: Callable[[str], None] = print
) -> tuple[llada.LLaDAConfig, layouts.Layout, str | None]:
  from htgrpo_jax import tasks

  note = None
  tok = config.model.tokenizer
  if not _tokenizer_present(tok):
    config = config.copy_and_resolve_references()
    config.model.tokenizer = stand_in_tokenizer()
    note = (
        f"model.tokenizer {tok!r} is not on this machine: a stand-in tokenizer (program shapes do "
        f"not depend on the text vocabulary)"
    )
    log(f"# {note}")
  layout = tasks.build_layout(config)
  try:
    model_cfg = lora.attach(
        llada.get_config(config.model.preset, **dict(config.model.get("overrides") or {})), config.model
    )
  except (TypeError, ValueError) as e:
    raise ValueError(f"model.preset / model.overrides: {e}") from None
  try:
    policy.check_compatible(model_cfg, layout)
  except ValueError as e:
    raise ValueError(
        f"model.preset={config.model.preset!r} with model.layout=" f"{config.model.layout!r}: {e}"
    ) from None
  return model_cfg, layout, note


def prepare(config: ml_collections.ConfigDict, topology: str, *, log: Callable[[str], None] = print) -> Target:
  """Validates ``config`` for ``topology`` and builds its ``Target``; compiles nothing.

  Raises:
    ValueError: the trainer's own messages for the config (``plan``), the mesh (``make_mesh``,
      ``check_mesh``) and the optimizer, or a bad topology.
  """
  p = plan(config)
  devices = topology_devices(topology)
  mesh = parallel.make_mesh(**dict(config.mesh), devices=list(devices.flat))
  check_mesh(p, mesh)
  optimizer = make_optimizer(config, p)
  model_cfg, layout, note = build_model(config, log=log)
  return Target(
      topology=topology, plan=p, model_cfg=model_cfg, layout=layout, mesh=mesh, optimizer=optimizer, tokenizer_note=note
  )


# ----------------------------------------------------------------------------------------------
# Abstract inputs (nothing allocated).


def abstract_state(t: Target) -> tuple[rl.TrainState, rl.TrainState]:
  """(abstract ``TrainState`` with shardings, its shardings): ``run_config.abstract_train_state``
  (which reads only ``model_cfg`` and ``layout`` of its task argument)."""
  state, shardings, _ = abstract_train_state(t, t.plan, t.optimizer, t.mesh)
  return state, shardings


def abstract_rollout(t: Target) -> rl.Rollout:
  """A ``Rollout`` of the plan's B rows (int32 codes / steps, fp32 stats), batch-sharded."""
  b, n, lp = t.plan.batch_size, t.layout.num_image_tokens, t.layout.prompt_length
  s = rl.rollout_shardings(t.mesh)
  sds = lambda shape, dt, sh: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  return rl.Rollout(
      prompt_tokens=sds((b, lp), jnp.int32, s.prompt_tokens),
      image_tokens=sds((b, n), jnp.int32, s.image_tokens),
      commit_step=sds((b, n), jnp.int32, s.commit_step),
      commit_entropy=sds((b, n), jnp.float32, s.commit_entropy),
      commit_logp=sds((b, n), jnp.float32, s.commit_logp),
      rewards=sds((b,), jnp.float32, s.rewards),
  )


def abstract_key(mesh: Mesh) -> jax.ShapeDtypeStruct:
  k = jax.eval_shape(lambda: jax.random.PRNGKey(0))  # the trainer's raw uint32 keys
  return jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=parallel.replicated(mesh))


def sampler_rows(t: Target, program: str) -> int:
  """Rows of a sampler program's input: the sketch batch (prompts x rl.num_sketches) for 'sketch'
  under ``sampler.share_sketch``, else the step's B images."""
  return t.plan.sketch_rows if program == "sketch" and t.plan.share_sketch else t.plan.batch_size


# ----------------------------------------------------------------------------------------------
# Compilation.


def _report(t: Target, program: str, rows: int, compiled, seconds: float, model_flops: float) -> ProgramReport:
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  kind = t.mesh.devices.flat[0].device_kind
  return ProgramReport(
      program=program,
      rows=rows,
      argument_bytes=int(mem.argument_size_in_bytes),
      output_bytes=int(mem.output_size_in_bytes),
      alias_bytes=int(mem.alias_size_in_bytes),
      temp_bytes=int(mem.temp_size_in_bytes),
      code_bytes=int(mem.generated_code_size_in_bytes),
      xla_flops=float(cost.get("flops", 0.0)),
      model_flops=model_flops / t.mesh.devices.size,
      compile_s=seconds,
      hbm_gib=HBM_GIB.get(kind, math.nan),
      device_kind=kind,
  )


def _guided(t: Target) -> bool:
  return t.plan.rl.estimator_guidance == "guided"


def lower_train_step(t: Target):
  """``rl.make_train_step`` as the trainer builds it (the 'guided' score function when the config
  asks for it; donated state), lowered on abstract inputs."""
  state, shardings = abstract_state(t)
  bare = fn = policy.make_canvas_logits_fn(t.model_cfg, t.layout)
  if _guided(t):
    fn = guided_canvas_logits_fn(fn, t.plan.rollout_sampler, t.layout.unconditional_prompts(1)[0])
  step = rl.make_train_step(
      fn, t.optimizer, t.plan.rl, mesh=t.mesh, state_shardings=shardings, supervised_logits_fn=bare
  )
  supervised = None
  if t.plan.rl.ptx_coef > 0:  # the step's P ground-truth pairs, replicated
    rep = parallel.replicated(t.mesh)
    rows = lambda n: jax.ShapeDtypeStruct((t.plan.prompts_per_step, n), jnp.int32, sharding=rep)
    supervised = rl.SupervisedBatch(rows(t.layout.prompt_length), rows(t.layout.num_image_tokens))
  return step.lower(state, abstract_rollout(t), abstract_key(t.mesh), supervised)


def lower_sampler(t: Target, program: str = "sampler"):
  """The rollout sampler's ``sample`` ('sampler'), ``sketch`` or ``paint`` with the train state's
  params and shardings, lowered on abstract inputs."""
  if program not in flops.SAMPLER_PROGRAMS:
    raise ValueError(f"program={program!r}: not a sampler program {flops.SAMPLER_PROGRAMS}")
  state, shardings = abstract_state(t)
  lay = t.layout
  fn = policy.make_canvas_logits_fn(t.model_cfg, lay)
  sampler = make_sampler(
      fn,
      t.plan.rollout_sampler,
      num_tokens=lay.num_image_tokens,
      mesh=t.mesh,
      params_sharding=shardings.policy_params(),
  )
  rows = sampler_rows(t, program)
  b2 = parallel.batch_sharding(t.mesh, 2)
  key = abstract_key(t.mesh)
  tokens = lambda n: jax.ShapeDtypeStruct((rows, n), jnp.int32, sharding=b2)
  if program == "paint":
    f32 = lambda: jax.ShapeDtypeStruct((rows, lay.num_image_tokens), jnp.float32, sharding=b2)
    canvas = CanvasState(
        canvas=tokens(lay.num_image_tokens),
        commit_step=tokens(lay.num_image_tokens),
        commit_entropy=f32(),
        commit_logp=f32(),
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=parallel.replicated(t.mesh)),
        prompt_tokens=tokens(lay.prompt_length),
        uncond_tokens=tokens(lay.prompt_length),
    )
    entry, args = sampler.paint, (state.policy_params(), canvas, key)
  else:
    prompts = tokens(lay.prompt_length)
    entry = sampler.sample if program == "sampler" else sampler.sketch
    args = (state.policy_params(), prompts, prompts, key)
  # The Sampler's entry points are host wrappers (argument checks) around jitted functions with
  # the in/out shardings; an outer jit traces through them into one program with those shardings.
  return jax.jit(entry).lower(*args)


def program_model_flops(t: Target, program: str) -> float:
  """Whole-program model FLOPs (all chips) of one call of ``program``."""
  if program == "train_step" and t.model_cfg.lora is not None:
    # flops.py counts full fine-tuning's backward (the base's weight gradients, which a frozen base
    # skips) and no adapter matmuls: LoRA's step is not modelled, so no figure rather than a wrong one.
    return math.nan
  if program == "train_step":
    guided_rows = 2 if _guided(t) and t.plan.rollout_sampler.use_cfg else 1
    return flops.train_step_flops(t.model_cfg, t.layout, t.plan.rl, t.plan.batch_size, guided_rows)
  return flops.sampler_flops(t.model_cfg, t.layout, t.plan.rollout_sampler, sampler_rows(t, program), program)


class DoesNotFit(ValueError):
  """XLA:TPU refused to compile a program: its temporaries alone exceed the chip's HBM.

  Attributes:
    program: the program; temp_gib: the temporaries XLA asked for (GiB, nan when its message did
    not say); hbm_gib: the HBM XLA had (GiB).
  """

  def __init__(self, program: str, message: str):
    self.program = program
    nums = [float(x) for x in re.findall(r"\(([0-9.]+)G\)", message)]
    self.temp_gib = nums[0] if nums else math.nan
    self.hbm_gib = nums[1] if len(nums) > 1 else math.nan
    super().__init__(message.strip().splitlines()[0])


def compile_program(t: Target, program: str) -> ProgramReport:
  """Lowers and compiles one of ``PROGRAMS`` for the target's slice.

  Raises:
    ValueError: unknown program.
    DoesNotFit: XLA ran out of HBM while compiling it (``RESOURCE_EXHAUSTED``).
  """
  if program not in PROGRAMS:
    raise ValueError(f"program={program!r}: choose from {PROGRAMS}")
  start = time.perf_counter()
  lowered = lower_train_step(t) if program == "train_step" else lower_sampler(t, program)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise DoesNotFit(program, str(e)) from None
  secs = time.perf_counter() - start
  rows = t.plan.batch_size if program == "train_step" else sampler_rows(t, program)
  return _report(t, program, rows, compiled, secs, program_model_flops(t, program))


def compile_all(
    config: ml_collections.ConfigDict,
    topology: str,
    programs: Sequence[str] = ("sampler", "train_step"),
    *,
    log: Callable[[str], None] = print,
) -> tuple[Target, list[ProgramReport]]:
  """Validates everything (programs, config, topology, mesh) before compiling anything, then
  compiles each program in turn."""
  bad = [p for p in programs if p not in PROGRAMS]
  if bad or not programs:
    raise ValueError(f"programs={list(programs)}: {bad or 'none given'}; choose from {PROGRAMS}")
  t = prepare(config, topology, log=log)
  return t, [compile_program(t, p) for p in programs]
