"""AOT pre-flight for TPU pods: compile the sampler and the HT-GRPO train step for a slice, on a CPU box.

libtpu describes any TPU slice (``jax.experimental.topologies``) without the hardware, so the real
sharded programs can be lowered and compiled here on abstract inputs (``jax.ShapeDtypeStruct`` with
``NamedSharding``s; nothing is allocated) and XLA:TPU reports what each chip would hold:

  report = aot.compile_program(aot.Setup(...), "train_step")
  report.total_gib, report.fits, report.model_tflops, report.compile_s

Per-device memory is ``compiled.memory_analysis()``: arguments + outputs - donated aliases + temps +
generated code (the peak XLA plans for; the runtime adds a little for its own buffers).

FLOPs come in two forms. ``xla_flops`` is ``compiled.cost_analysis()['flops']`` per device, but XLA
counts a while-loop body ONCE (the scanned layers, the K inner updates, the micro-batch scan and the
sampler's T steps are all loops), so it under-counts by orders of magnitude on these programs.
``model_flops`` is the analytic count of bench/train_step.py (matmul FLOPs, rematerialisation not
counted), per device: the number to plan throughput with.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from htgrpo_jax import parallel, rl
from htgrpo_jax.models import layouts, llada, policy
from htgrpo_jax.sampling import SamplerConfig, make_sampler
from htgrpo_jax.sampling.sampler import CanvasState

# HBM per chip in GiB, by ``device_kind`` (the names libtpu's topology descriptions use).
HBM_GIB: dict[str, float] = {
    "TPU v4": 32.0,
    "TPU v5": 95.0,        # v5p
    "TPU v5p": 95.0,
    "TPU v5 lite": 16.0,   # v5e
    "TPU v5e": 16.0,
    "TPU v6 lite": 32.0,   # v6e (Trillium)
    "TPU v6e": 32.0,
}

PROGRAMS = ("sampler", "sketch", "paint", "train_step")
LAYOUT_KINDS = ("mmada", "dimoo", "embedded")
REF_DTYPES = ("float32", "bfloat16")

# Words of the scratch tokenizer: layouts need *a* tokenizer, but program shapes depend only on the
# layout's sizes (prompt length, slots), never on the vocabulary of the text part.
_WORDS = "a red blue green circle square above below left of right two".split()
_DIMOO_SPECIALS = ["<system>", "</system>", "<user>", "</user>", "<uncondition>"]


def scratch_tokenizer(path: str | None = None) -> str:
  """Writes a tiny WordLevel tokenizer ([PAD]=0, [UNK]=1, a few words, DiMOO's specials) to ``path``
  (a fresh temp dir when None) and returns the directory; layouts load tokenizers from local dirs."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  path = path or tempfile.mkdtemp(prefix="aot_tok_")
  vocab = {"[PAD]": 0, "[UNK]": 1}
  for w in _WORDS + _DIMOO_SPECIALS:
    vocab.setdefault(w, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                          additional_special_tokens=_DIMOO_SPECIALS).save_pretrained(path)
  return path


def default_layout_kind(model: str) -> str:
  return {"mmada_8b": "mmada", "lumina_dimoo_8b": "dimoo"}.get(model, "embedded")


def build_model(model: str, *, layout: str | None = None, tokenizer: str | None = None,
                image_size: int = 512, embedded_grid: tuple[int, int] = (8, 8),
                embedded_codebook: int = 128, embedded_prompt_length: int = 16,
                **overrides) -> tuple[llada.LLaDAConfig, layouts.Layout]:
  """A LLaDA preset and a layout it serves.

  Args:
    model: a ``llada.PRESETS`` name ('mmada_8b', 'lumina_dimoo_8b', 'tiny', 'shapes').
    layout: 'mmada' (L = 1539, 1024 slots), 'dimoo' (``image_size``: 512 -> 1024 slots) or
      'embedded' (``embedded_*`` sizes); None = the model's own.
    tokenizer: a local tokenizer dir; None writes a scratch one (shapes do not depend on it).
    overrides: ``LLaDAConfig`` fields (e.g. remat='full', scan_layers=True).

  Raises:
    ValueError: unknown model / layout, or a model that cannot serve the layout.
  """
  if model not in llada.PRESETS:
    raise ValueError(f"model={model!r}: unknown preset; choose from {sorted(llada.PRESETS)}")
  layout = layout or default_layout_kind(model)
  if layout not in LAYOUT_KINDS:
    raise ValueError(f"layout={layout!r}: choose from {LAYOUT_KINDS}")
  tok = tokenizer or scratch_tokenizer()
  if layout == "mmada":
    lay = layouts.MMaDALayout(tok)
  elif layout == "dimoo":
    lay = layouts.DiMOOLayout(tok, height=image_size, width=image_size)
  else:
    lay = layouts.EmbeddedLayout(tok, grid=embedded_grid, codebook_size=embedded_codebook,
                                 prompt_length=embedded_prompt_length)
    # The small presets have no pad mask; the embedded layout left-pads, so switch it on.
    overrides = {"use_pad_mask": True, "pad_id": lay.pad_id, **overrides}
    base = llada.PRESETS[model]
    if base.learned_pos_emb and base.learned_pos_emb < lay.seq_len:
      overrides.setdefault("learned_pos_emb", lay.seq_len)
  cfg = llada.get_config(model, **overrides)
  policy.check_compatible(cfg, lay)
  return cfg, lay


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything that fixes the compiled programs' shapes and shardings.

  Attributes:
    model_cfg: the backbone (remat / scan_layers as configured).
    layout: the sequence layout (L, N, Lp, C).
    rl: the HT-GRPO config (K, estimator, beta, group_size; its micro_batch_size is replaced).
    sampler: the sampler config (T, CFG).
    topology: a libtpu topology name, e.g. 'v5p:4x4x4' (64 chips), 'v5e:16x16' (256 chips).
    mesh_shape: (data, fsdp, tensor); the product must equal the topology's chip count.
    batch: images per RL step, B = prompts x group_size.
    micro_batch: rows per gradient micro-batch PER DEVICE (0 = the whole batch at once); the
      global micro-batch is micro_batch * data * fsdp.
    ref_dtype: storage dtype of the frozen reference params ('float32' as the trainer keeps them,
      or 'bfloat16': half the memory, the forward computes in bf16 either way).
    share_sketch: the 'sketch' program runs on B / group_size prompt rows (the trainer's
      ``sampler.share_sketch``), else on B rows.
    learning_rate, weight_decay, clip_norm: the AdamW optimizer (shapes only; values irrelevant).
  """
  model_cfg: llada.LLaDAConfig
  layout: layouts.Layout
  rl: rl.HTGRPOConfig
  sampler: SamplerConfig
  topology: str
  mesh_shape: tuple[int, int, int]
  batch: int
  micro_batch: int = 0
  ref_dtype: str = "float32"
  share_sketch: bool = False
  learning_rate: float = 1e-6
  weight_decay: float = 0.0
  clip_norm: float | None = 1.0

  @property
  def batch_ways(self) -> int:
    return int(self.mesh_shape[0] * self.mesh_shape[1])

  @property
  def global_micro_batch(self) -> int | None:
    return self.micro_batch * self.batch_ways if self.micro_batch else None

  @property
  def rl_config(self) -> rl.HTGRPOConfig:
    """``rl`` with micro_batch_size set from the per-device ``micro_batch``."""
    return dataclasses.replace(self.rl, micro_batch_size=self.global_micro_batch)


@dataclasses.dataclass(frozen=True)
class ProgramReport:
  """What one compiled program needs per device.

  Attributes:
    program: one of ``PROGRAMS``.
    rows: batch rows of the program's input (B; prompts for a shared sketch).
    argument_bytes, output_bytes, alias_bytes, temp_bytes, code_bytes: ``memory_analysis()``.
    xla_flops: ``cost_analysis()['flops']`` per device (loop bodies counted once; see module doc).
    model_flops: analytic matmul FLOPs per device per call.
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
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

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
# Validation and the mesh.


def topology_devices(topology: str) -> np.ndarray:
  """The devices of a libtpu topology description (object array, one per chip).

  Raises:
    ValueError: libtpu is missing or does not know ``topology`` (names the field).
  """
  # Several AOT processes may share a build box; without this libtpu's lockfile fails the second.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not isinstance(topology, str) or ":" not in topology:
    raise ValueError(f"topology={topology!r}: expected '<kind>:<shape>', e.g. 'v5p:4x4x4' or 'v5e:16x16'")
  from jax.experimental import topologies
  try:
    return np.array(topologies.get_topology_desc(topology, "tpu").devices)
  except Exception as e:  # libtpu raises XlaRuntimeError / RuntimeError with its own text
    raise ValueError(f"topology={topology!r}: libtpu cannot describe it ({str(e).splitlines()[0]}); "
                     "use e.g. 'v5p:4x4x4', 'v5e:2x2', 'v5e:16x16', 'v6e:4x4'") from None


def validate(setup: Setup, n_chips: int) -> None:
  """Host checks before anything compiles.

  Raises:
    ValueError: naming the field: mesh_shape (non-positive, product != chip count), batch (not a
      multiple of data*fsdp or of group_size; sketch prompts not a multiple of data*fsdp),
      micro_batch (negative, or its global size does not divide the batch), ref_dtype.
  """
  shape = tuple(setup.mesh_shape)
  if len(shape) != 3 or any(not isinstance(s, (int, np.integer)) or s < 1 for s in shape):
    raise ValueError(f"mesh_shape={setup.mesh_shape!r}: expected three positive ints (data, fsdp, tensor)")
  if int(np.prod(shape)) != n_chips:
    raise ValueError(f"mesh_shape={shape}: data*fsdp*tensor = {int(np.prod(shape))} but topology "
                     f"{setup.topology!r} has {n_chips} chips")
  if setup.batch < 1 or setup.batch % setup.batch_ways:
    raise ValueError(f"batch={setup.batch}: must be a positive multiple of data*fsdp = {setup.batch_ways}")
  if setup.batch % setup.rl.group_size:
    raise ValueError(f"batch={setup.batch}: must be a multiple of rl.group_size = {setup.rl.group_size}")
  if setup.share_sketch and (setup.batch // setup.rl.group_size) % setup.batch_ways:
    raise ValueError(f"batch={setup.batch}: with share_sketch the sketch runs on batch / group_size = "
                     f"{setup.batch // setup.rl.group_size} prompts, not a multiple of data*fsdp = "
                     f"{setup.batch_ways}")
  if setup.micro_batch < 0:
    raise ValueError(f"micro_batch={setup.micro_batch}: must be >= 0 (0 = the whole batch)")
  if setup.micro_batch and setup.batch % setup.global_micro_batch:
    raise ValueError(f"micro_batch={setup.micro_batch}: per device x data*fsdp = "
                     f"{setup.global_micro_batch} rows must divide batch={setup.batch}")
  if setup.ref_dtype not in REF_DTYPES:
    raise ValueError(f"ref_dtype={setup.ref_dtype!r}: choose from {REF_DTYPES}")


def topology_mesh(setup: Setup) -> Mesh:
  """The validated ``('data', 'fsdp', 'tensor')`` mesh over the topology's chips (Auto axes).

  Raises:
    ValueError: see ``topology_devices`` and ``validate``.
  """
  devices = topology_devices(setup.topology)
  validate(setup, devices.size)
  # Row-major reshape keeps 'tensor' innermost: on TPU the last axis gets the nearest chips.
  return Mesh(devices.reshape(tuple(setup.mesh_shape)), parallel.MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * 3)


# ----------------------------------------------------------------------------------------------
# Abstract inputs (nothing allocated).


def _with_sharding(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def make_optimizer(setup: Setup) -> optax.GradientTransformation:
  return rl.make_optimizer(setup.learning_rate, clip_norm=setup.clip_norm,
                           weight_decay=setup.weight_decay)


def abstract_train_state(setup: Setup, mesh: Mesh, optimizer: optax.GradientTransformation
                         ) -> tuple[rl.TrainState, rl.TrainState]:
  """(abstract ``TrainState`` with shardings, its sharding pytree).

  Params fp32 (the preset's param_dtype) on the logical shardings; AdamW moments follow their
  params; the reference params (when beta > 0) share the params' shardings in ``ref_dtype``.
  """
  cfg, lay = setup.model_cfg, setup.layout
  pshard = policy.param_shardings(cfg, lay, mesh)
  params = policy.abstract_params(cfg, lay, mesh)
  use_ref = setup.rl.beta > 0
  state = jax.eval_shape(lambda p: rl.TrainState.create(p, optimizer, with_reference=use_ref), params)
  if use_ref:
    ref = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(setup.ref_dtype)),
                       state.ref_params)
    state = state.replace(ref_params=ref)
  from htgrpo_jax.trainer import state_shardings  # the trainer's own layout of the state
  shardings = state_shardings(state, pshard, optimizer, mesh)
  return _with_sharding(state, shardings), shardings


def abstract_rollout(setup: Setup, mesh: Mesh) -> rl.Rollout:
  """A ``Rollout`` of B rows (int32 codes / steps, fp32 stats) split over ('data', 'fsdp')."""
  b, n, lp = setup.batch, setup.layout.num_image_tokens, setup.layout.prompt_length
  s = rl.rollout_shardings(mesh)
  sds = lambda shape, dt, sh: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  return rl.Rollout(prompt_tokens=sds((b, lp), jnp.int32, s.prompt_tokens),
                    image_tokens=sds((b, n), jnp.int32, s.image_tokens),
                    commit_step=sds((b, n), jnp.int32, s.commit_step),
                    commit_entropy=sds((b, n), jnp.float32, s.commit_entropy),
                    commit_logp=sds((b, n), jnp.float32, s.commit_logp),
                    rewards=sds((b,), jnp.float32, s.rewards))


def abstract_key(mesh: Mesh) -> jax.ShapeDtypeStruct:
  k = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=parallel.replicated(mesh))


# ----------------------------------------------------------------------------------------------
# Analytic FLOPs.


def matmul_flops(cfg: llada.LLaDAConfig, rows: int, length: int, slots: int, codebook: int) -> float:
  """Matmul FLOPs of one forward of ``rows`` sequences of ``length`` tokens with the LM head on
  ``slots`` positions x ``codebook`` rows: rows * (layers * (8 L D^2 + 4 L^2 D + 6 L D M) + 2 N D C)."""
  d, m = cfg.d_model, cfg.mlp_hidden
  per_layer = 8 * length * d * d + 4 * length * length * d + 6 * length * d * m
  return float(rows) * (cfg.n_layers * per_layer + 2 * slots * d * codebook)


def forward_flops(cfg: llada.LLaDAConfig, layout: layouts.Layout, rows: int) -> float:
  """``matmul_flops`` of one forward of ``rows`` sequences of ``layout``."""
  return matmul_flops(cfg, rows, layout.seq_len, layout.num_image_tokens, layout.codebook_size)


def program_model_flops(setup: Setup, program: str, rows: int) -> float:
  """Whole-program model FLOPs (all chips) of one call; rematerialisation not counted."""
  cfg, lay = setup.model_cfg, setup.layout
  cfg_rows = 2 if setup.sampler.use_cfg else 1
  if program == "train_step":
    r = setup.rl_config
    n_distinct = max(rl.canvas_groups(r)) + 1
    passes = n_distinct * (2 if r.beta > 0 else 1) + 3 * r.num_iterations
    return passes * forward_flops(cfg, lay, rows)
  steps = {"sampler": setup.sampler.num_steps, "sketch": setup.sampler.sketch_steps,
           "paint": setup.sampler.num_steps - setup.sampler.sketch_steps}[program]
  return steps * forward_flops(cfg, lay, cfg_rows * rows)


# ----------------------------------------------------------------------------------------------
# Compilation.


def _report(program: str, rows: int, compiled, seconds: float, model_flops: float, mesh: Mesh
            ) -> ProgramReport:
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  kind = mesh.devices.flat[0].device_kind
  return ProgramReport(
      program=program, rows=rows, argument_bytes=int(mem.argument_size_in_bytes),
      output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
      temp_bytes=int(mem.temp_size_in_bytes), code_bytes=int(mem.generated_code_size_in_bytes),
      xla_flops=float(cost.get("flops", 0.0)), model_flops=model_flops / mesh.devices.size,
      compile_s=seconds, hbm_gib=HBM_GIB.get(kind, math.nan), device_kind=kind)


def compile_train_step(setup: Setup, mesh: Mesh) -> ProgramReport:
  """AOT-compiles ``rl.make_train_step`` (donated state) on abstract inputs."""
  optimizer = make_optimizer(setup)
  state, shardings = abstract_train_state(setup, mesh, optimizer)
  fn = policy.make_canvas_logits_fn(setup.model_cfg, setup.layout)
  step = rl.make_train_step(fn, optimizer, setup.rl_config, mesh=mesh, state_shardings=shardings)
  start = time.perf_counter()
  compiled = step.lower(state, abstract_rollout(setup, mesh), abstract_key(mesh)).compile()
  secs = time.perf_counter() - start
  return _report("train_step", setup.batch, compiled, secs,
                 program_model_flops(setup, "train_step", setup.batch), mesh)


def _sampler_rows(setup: Setup, program: str) -> int:
  if program == "sketch" and setup.share_sketch:
    return setup.batch // setup.rl.group_size
  return setup.batch


def compile_sampler(setup: Setup, mesh: Mesh, program: str = "sampler") -> ProgramReport:
  """AOT-compiles the sampler's ``sample`` ('sampler'), ``sketch`` or ``paint`` with fp32 params on
  the train state's param shardings (as the trainer calls it with ``state.params``)."""
  if program not in ("sampler", "sketch", "paint"):
    raise ValueError(f"program={program!r}: not a sampler program")
  cfg, lay = setup.model_cfg, setup.layout
  fn = policy.make_canvas_logits_fn(cfg, lay)
  pshard = policy.param_shardings(cfg, lay, mesh)
  params = policy.abstract_params(cfg, lay, mesh)
  sampler = make_sampler(fn, setup.sampler, num_tokens=lay.num_image_tokens, mesh=mesh,
                         params_sharding=pshard)
  rows = _sampler_rows(setup, program)
  b2 = parallel.batch_sharding(mesh, 2)
  key = abstract_key(mesh)
  tokens = lambda n: jax.ShapeDtypeStruct((rows, n), jnp.int32, sharding=b2)
  if program == "paint":
    f32 = lambda: jax.ShapeDtypeStruct((rows, lay.num_image_tokens), jnp.float32, sharding=b2)
    state = CanvasState(canvas=tokens(lay.num_image_tokens), commit_step=tokens(lay.num_image_tokens),
                        commit_entropy=f32(), commit_logp=f32(),
                        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=parallel.replicated(mesh)),
                        prompt_tokens=tokens(lay.prompt_length), uncond_tokens=tokens(lay.prompt_length))
    entry, args = sampler.paint, (params, state, key)
  else:
    prompts = tokens(lay.prompt_length)
    entry = sampler.sample if program == "sampler" else sampler.sketch
    args = (params, prompts, prompts, key)
  # The Sampler's entry points are host wrappers (argument checks) around jitted functions with
  # the in/out shardings; an outer jit traces through them into one program with those shardings.
  start = time.perf_counter()
  compiled = jax.jit(entry).lower(*args).compile()
  secs = time.perf_counter() - start
  return _report(program, rows, compiled, secs, program_model_flops(setup, program, rows), mesh)


def compile_program(setup: Setup, program: str, mesh: Mesh | None = None) -> ProgramReport:
  """Validates ``setup`` and compiles one of ``PROGRAMS``.

  Raises:
    ValueError: unknown program, topology or a bad setup field (see ``validate``).
  """
  if program not in PROGRAMS:
    raise ValueError(f"program={program!r}: choose from {PROGRAMS}")
  mesh = mesh if mesh is not None else topology_mesh(setup)
  if program == "train_step":
    return compile_train_step(setup, mesh)
  return compile_sampler(setup, mesh, program)


def compile_all(setup: Setup, programs: Sequence[str] = ("sampler", "train_step")) -> list[ProgramReport]:
  """Validates once (before compiling anything), then compiles each program in turn."""
  bad = [p for p in programs if p not in PROGRAMS]
  if bad:
    raise ValueError(f"programs={list(programs)}: {bad} not in {PROGRAMS}")
  mesh = topology_mesh(setup)
  return [compile_program(setup, p, mesh) for p in programs]


# ----------------------------------------------------------------------------------------------
# Reporting.

TABLE_HEADER = ("| topology | mesh (data,fsdp,tensor) | batch | micro-batch/device | remat | program "
                "| GiB/device | HBM of the chip | fits | TFLOPs/device (model) | XLA TFLOPs/device "
                "(loops once) | compile s |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|")


def markdown_row(setup: Setup, report: ProgramReport) -> str:
  """One table row (see ``TABLE_HEADER``); the micro-batch column applies to the train step."""
  d, f, t = setup.mesh_shape
  mb = (setup.micro_batch or setup.batch // setup.batch_ways) if report.program == "train_step" else "-"
  remat = f"{setup.model_cfg.remat}{'+scan' if setup.model_cfg.scan_layers else ''}"
  return (f"| {setup.topology} | {d},{f},{t} | {report.rows} | {mb} | {remat} | {report.program} | "
          f"{_num(report.total_gib)} | {report.hbm_gib:g} | {'yes' if report.fits else 'NO'} | "
          f"{_num(report.model_tflops)} | {_num(report.xla_flops / 1e12)} | {report.compile_s:.0f} |")


def _num(x: float) -> str:
  """Two decimals, or three significant digits for tiny values (the test-sized programs)."""
  return f"{x:.2f}" if abs(x) >= 0.1 or x == 0 else f"{x:.3g}"


def memory_line(report: ProgramReport) -> str:
  g = lambda b: f"{b / 2**30:.2f}"
  return (f"{report.program}: arguments {g(report.argument_bytes)} + outputs {g(report.output_bytes)} "
          f"- aliased {g(report.alias_bytes)} + temps {g(report.temp_bytes)} + code "
          f"{g(report.code_bytes)} = {report.total_gib:.2f} GiB/device of {report.hbm_gib:g} "
          f"({report.device_kind})")
