"""AOT pre-flight: compiles a training config's sampler and train step for a TPU slice, on any CPU box.

  python launch/aot_compile.py --config=configs/mmada_geneval.py --topology=v5p:4x4x4
  python launch/aot_compile.py --config=configs/mmada_geneval.py --topology=v5p:2x2x1 \
      --config.mesh.fsdp=4 --config.mesh.tensor=1 --config.prompts_per_step=4 \
      --config.rl.micro_batch_size=4 --programs=train_step

The config is the one ``launch/train.py`` takes, with the same ``--config.key=value`` overrides:
model, layout, RL and sampler settings, batch (prompts_per_step x rl.group_size), micro-batch
(rl.micro_batch_size rows over data*fsdp), mesh (``config.mesh`` over the slice's chips) and
optimizer all come from it, through the trainer's own plan, checks and abstract state. The only
flags of this tool: ``--topology`` (a libtpu topology name), ``--programs`` and ``--output``.

Nothing is allocated and no TPU is needed: libtpu describes the slice and XLA:TPU compiles the real
sharded programs on abstract inputs. Prints per-device memory (arguments + outputs - donated aliases
+ temps + code) against the chip's HBM, analytic model TFLOPs per device per call, XLA's own FLOP
count (which counts loop bodies once) and the compile time, and a Markdown table row per program
(README's AOT table). A tokenizer folder of the config that is not on this machine is replaced by a
stand-in (shapes do not depend on it). Libtpu prints harmless TPU_WORKER_HOSTNAMES warnings on a
CPU machine.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host backend; the TPU is only described
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config: path.py[:arg], as launch/train.py takes it.", lock_config=True
)
_TOPOLOGY = flags.DEFINE_string("topology", None, "libtpu topology, e.g. v5p:4x4x4 (64 chips), v5e:16x16.")
_PROGRAMS = flags.DEFINE_list("programs", ["sampler", "train_step"], "Programs: sampler, sketch, paint, train_step.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the reports as JSON to this file.")

TABLE_HEADER = (
    "| model | topology | mesh (data,fsdp,tensor) | batch | micro-batch/device | remat | program "
    "| GiB/device | HBM | fits | model TFLOPs/device/call | compile s (2-core CPU) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _num(x: float) -> str:
  """Two decimals, or three significant digits for tiny values (the test-sized programs)."""
  if x != x:  # nan: not modelled (the model FLOPs of a LoRA step)
    return "-"
  return f"{x:.2f}" if abs(x) >= 0.1 or x == 0 else f"{x:.3g}"


def micro_batch_per_device(t) -> int:
  """Rows per device of each gradient micro-batch (the whole batch's share when not micro-batched)."""
  ways = t.mesh.shape["data"] * t.mesh.shape["fsdp"]
  return (t.plan.rl.micro_batch_size or t.plan.batch_size) // ways


def markdown_row(t, report) -> str:
  """One row of ``TABLE_HEADER``; the micro-batch column applies to the train step."""
  m = t.mesh.shape
  mb = micro_batch_per_device(t) if report.program == "train_step" else "-"
  remat = f"{t.model_cfg.remat}{'+scan' if t.model_cfg.scan_layers else ''}"
  model = model_label(t)
  return (
      f"| {model} | {t.topology} | {m['data']},{m['fsdp']},{m['tensor']} | {report.rows} | {mb} | "
      f"{remat} | {report.program} | {_num(report.total_gib)} | {report.hbm_gib:g} | "
      f"{'yes' if report.fits else 'NO'} | {_num(report.model_tflops)} | {report.compile_s:.0f} |"
  )


def model_label(t) -> str:
  """The table's model column: the preset, with the LoRA rank when adapters are trained."""
  lora = t.model_cfg.lora
  return _CONFIG.value.model.preset + (f" LoRA r{lora.rank}" if lora else "")


def refused_row(t, e) -> str:
  """A row for a program XLA:TPU refused to compile: its temporaries alone exceed the HBM."""
  from htgrpo_jax import aot

  m = t.mesh.shape
  mb = micro_batch_per_device(t) if e.program == "train_step" else "-"
  remat = f"{t.model_cfg.remat}{'+scan' if t.model_cfg.scan_layers else ''}"
  rows = t.plan.batch_size if e.program == "train_step" else aot.sampler_rows(t, e.program)
  return (
      f"| {model_label(t)} | {t.topology} | {m['data']},{m['fsdp']},{m['tensor']} | {rows} | {mb} | "
      f"{remat} | {e.program} | > {_num(e.temp_gib)} (temps) | {e.hbm_gib:g} | NO | - | - |"
  )


def memory_line(report) -> str:
  g = lambda b: f"{b / 2**30:.2f}"
  return (
      f"{report.program}: arguments {g(report.argument_bytes)} + outputs {g(report.output_bytes)} "
      f"- aliased {g(report.alias_bytes)} + temps {g(report.temp_bytes)} + code "
      f"{g(report.code_bytes)} = {report.total_gib:.2f} GiB/device of {report.hbm_gib:g} "
      f"({report.device_kind}); model {_num(report.model_tflops)} TFLOPs/device, XLA "
      f"{_num(report.xla_flops / 1e12)} (loop bodies once)"
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or not _TOPOLOGY.value:
    raise app.UsageError("--config=<training config> and --topology=<libtpu topology> are required")
  from htgrpo_jax import aot

  bad = [p for p in _PROGRAMS.value if p not in aot.PROGRAMS]
  if bad or not _PROGRAMS.value:
    raise app.UsageError(f"--programs={','.join(_PROGRAMS.value)}: choose from {aot.PROGRAMS}")
  try:
    t = aot.prepare(_CONFIG.value, _TOPOLOGY.value)  # every check before the first compile
  except ValueError as e:  # a config / topology / mesh problem, named by key: no traceback
    sys.exit(f"aot_compile.py: {e}")
  cfg, lay, p, r = t.model_cfg, t.layout, t.plan, t.plan.rl
  s = p.rollout_sampler
  print(
      f"# {_CONFIG.value.model.preset}: d_model={cfg.d_model}, {cfg.n_layers} layers, "
      f"{cfg.num_params() / 1e9:.2f}B params, L={lay.seq_len}, N={lay.num_image_tokens}, "
      f"C={lay.codebook_size}",
      flush=True,
  )
  print(
      f"# {t.topology}: {t.mesh.devices.size} x {t.mesh.devices.flat[0].device_kind}, mesh "
      f"{dict(t.mesh.shape)}; batch {p.batch_size} = {p.prompts_per_step} prompts x G={r.group_size}, "
      f"micro-batch {r.micro_batch_size or p.batch_size} rows ({micro_batch_per_device(t)}/device); "
      f"K={r.num_iterations} ({r.estimator}, guidance {r.estimator_guidance}), beta={r.beta}; "
      f"sampler T={s.num_steps} cfg={s.cfg_scale}"
      + (f", share_sketch ({p.sketch_rows} sketch rows)" if p.share_sketch else ""),
      flush=True,
  )
  rows, reports, refused = [], [], []
  for program in _PROGRAMS.value:
    print(f"# compiling {program} ...", flush=True)
    try:
      report = aot.compile_program(t, program)
    except aot.DoesNotFit as e:  # XLA:TPU refuses a program whose temporaries exceed HBM
      print(f"# {program}: does not fit: {e}", flush=True)
      rows.append(refused_row(t, e))
      refused.append(dict(program=program, fits=False, temp_gib=e.temp_gib, hbm_gib=e.hbm_gib, error=str(e)))
      continue
    print(f"# {memory_line(report)}; compile {report.compile_s:.0f} s", flush=True)
    rows.append(markdown_row(t, report))
    reports.append(report)
  print(TABLE_HEADER)
  print("\n".join(rows), flush=True)
  if _OUTPUT.value:
    out = dict(
        config=_CONFIG.value.to_dict(),
        topology=t.topology,
        mesh=dict(t.mesh.shape),
        tokenizer_note=t.tokenizer_note,
        reports=[
            dict(
                vars(rep),
                total_gib=rep.total_gib,
                fits=rep.fits,
                micro_batch_per_device=(micro_batch_per_device(t) if rep.program == "train_step" else None),
            )
            for rep in reports
        ]
        + refused,
    )
    with open(_OUTPUT.value, "w") as f:
      json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
  app.run(main)
