"""The AOT pre-flight compiles a training config's sampler and train step for a TPU topology
description on this CPU (libtpu describes the slice; nothing is allocated)."""

import json
import os
import re
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.helpers.tpu import require_libtpu  # noqa: E402

require_libtpu()

from htgrpo_jax import aot, flops, tasks  # noqa: E402
from tests.helpers.configs import set_keys  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "aot_compile.py")


def tiny_config(**changes):
  """configs/geneval.py:htgrpo,tiny (4 prompts x G=4 = 16 images, K=3, T=4) on a 1,2,2 mesh; keys
  as dotted paths, e.g. ``**{"rl.beta": 0.0}``."""
  config = tasks.load_config_file("configs/geneval.py", "htgrpo,tiny")
  config.mesh.update(data=1, fsdp=2, tensor=2)
  return set_keys(config, **changes)


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def compiled():
  return aot.compile_all(tiny_config(), "v5e:2x2", ("sampler", "train_step"))


def test_train_step_and_sampler_compile_for_the_configs_batch_and_state(compiled):
  target, (sampler, step) = compiled
  assert (sampler.program, step.program) == ("sampler", "train_step")
  assert sampler.rows == step.rows == 16 == target.plan.batch_size
  for report in (sampler, step):
    assert report.device_kind == "TPU v5 lite" and report.fits
    assert report.temp_bytes > 0 and report.xla_flops > 0
  # The train step takes the whole state (fp32 params, two Adam moments, the fp32 reference, beta > 0)
  # split over 4 chips, and the rollout; it donates the state, so that much comes back aliased.
  state, _ = aot.abstract_state(target)
  state_bytes = _nbytes(state)
  assert _nbytes(state.params) * 4 <= state_bytes
  assert state_bytes / 4 <= step.argument_bytes <= state_bytes + _nbytes(aot.abstract_rollout(target))
  assert state_bytes / 4 <= step.alias_bytes <= step.argument_bytes
  # The sampler holds the params (not the optimizer state) and returns the B x N record.
  assert sampler.argument_bytes < step.argument_bytes
  assert sampler.alias_bytes == 0


def test_config_overrides_reach_the_compiled_program(compiled):
  """beta = 0: no reference params in the state, so each chip's arguments shrink by their share."""
  target, (_, step) = compiled
  no_ref = aot.compile_program(aot.prepare(tiny_config(**{"rl.beta": 0.0}), "v5e:2x2"), "train_step")
  params_share = _nbytes(aot.abstract_state(target)[0].params) / 4
  assert step.argument_bytes - no_ref.argument_bytes >= 0.9 * params_share


def test_model_flops_are_the_programs_per_chip(compiled):
  target, (sampler, step) = compiled
  p = target.plan
  assert step.model_flops * 4 == pytest.approx(
      flops.train_step_flops(target.model_cfg, target.layout, p.rl, p.batch_size)
  )
  assert sampler.model_flops * 4 == pytest.approx(
      flops.sampler_flops(target.model_cfg, target.layout, p.rollout_sampler, p.batch_size)
  )
  # XLA counts each loop body (T sampler steps, K updates) once: it sees fewer FLOPs than run.
  assert step.xla_flops < step.model_flops and sampler.xla_flops < sampler.model_flops


def test_shared_sketch_compiles_on_the_sketch_rows():
  # 4 prompts x rl.num_sketches = 2 sketches = 8 rows, a multiple of data*fsdp = 2.
  t = aot.prepare(tiny_config(**{"sampler.share_sketch": True, "rl.num_sketches": 2}), "v5e:2x2")
  report = aot.compile_program(t, "sketch")
  assert report.program == "sketch" and report.rows == 8 and report.fits


def test_t2i_config_without_its_tokenizer_uses_a_stand_in():
  """configs/mmada_geneval.py on this machine (no /ckpt): the real MMaDA layout and 8B backbone."""
  config = tasks.load_config_file("configs/mmada_geneval.py")
  notes = []
  t = aot.prepare(config, "v5p:4x4x4", log=notes.append)
  assert notes and "model.tokenizer" in notes[0] and t.tokenizer_note
  assert (t.layout.seq_len, t.layout.num_image_tokens, t.layout.codebook_size) == (1539, 1024, 8192)
  assert t.model_cfg.num_params() > 7e9 and t.model_cfg.remat == "full"
  assert dict(t.mesh.shape) == {"data": 1, "fsdp": 16, "tensor": 4}
  assert t.plan.batch_size == 128 and t.plan.rl.micro_batch_size == 32


@pytest.mark.parametrize(
    "config, topology, match",
    [
        (tiny_config(), "v9z:2x2", "topology="),
        (tiny_config(), "v5e", "topology="),
        (tiny_config(**{"mesh.fsdp": 4}), "v5e:2x2", "mesh:"),  # 1 x 4 x 2 = 8 > 4 chips
        (
            tiny_config(**{"mesh.fsdp": 4, "mesh.tensor": 1, "rl.group_size": 2, "prompts_per_step": 3}),
            "v5e:2x2",
            "prompts_per_step \\* rl.group_size = 6",
        ),  # 6 rows over data*fsdp = 4
        (
            tiny_config(**{"mesh.fsdp": 4, "mesh.tensor": 1, "rl.micro_batch_size": 2}),
            "v5e:2x2",
            "rl.micro_batch_size=2",
        ),  # 2 rows over 4 chips
        (tiny_config(**{"rl.micro_batch_size": 3}), "v5e:2x2", "rl.micro_batch_size"),  # 3 does not divide 16
        (tiny_config(**{"rl.preset": "ppo"}), "v5e:2x2", "rl.preset="),
        (tiny_config(**{"world.kind": "sdxl"}), "v5e:2x2", "world.kind="),
    ],
)
def test_bad_config_or_slice_raises_naming_the_key(config, topology, match):
  with pytest.raises(ValueError, match=match):
    aot.compile_all(config, topology)


def test_unknown_program_raises_before_anything_else():
  with pytest.raises(ValueError, match="programs="):
    aot.compile_all(None, "v5e:2x2", ("forward",))


def _cli(*args, timeout=600):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_cli_compiles_the_training_config_with_its_overrides(tmp_path):
  """launch/aot_compile.py --config=... --config.key=value: the tiny run's own batch, G, K, sampler."""
  out_json = tmp_path / "aot.json"
  out = _cli(
      "--config=configs/geneval.py:htgrpo,tiny",
      "--topology=v5e:2x2",
      "--config.mesh.data=1",
      "--config.mesh.fsdp=2",
      "--config.mesh.tensor=2",
      "--config.rl.micro_batch_size=4",
      "--programs=train_step",
      f"--output={out_json}",
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| shapes | v5e:2x2")]
  # 4 prompts x G=4 = 16 images; micro-batches of 4 rows over data*fsdp = 2 -> 2 per device.
  assert len(rows) == 1 and rows[0].startswith("| shapes | v5e:2x2 | 1,2,2 | 16 | 2 | none | train_step |")
  assert "| yes |" in rows[0] and "K=3" in out.stdout
  header = [ln for ln in out.stdout.splitlines() if ln.startswith("| model |")]
  assert len(header) == 1 and header[0].count("|") == rows[0].count("|")
  saved = json.loads(out_json.read_text())
  (report,) = saved["reports"]
  assert report["program"] == "train_step" and report["micro_batch_per_device"] == 2
  assert report["total_gib"] > 0 and saved["config"]["rl"]["micro_batch_size"] == 4


def test_cli_names_a_mesh_that_does_not_fit_the_slice():
  out = _cli(
      "--config=configs/geneval.py:htgrpo,tiny",
      "--topology=v5e:2x2",
      "--config.mesh.data=1",
      "--config.mesh.fsdp=4",
      "--config.mesh.tensor=2",
      timeout=300,
  )
  assert out.returncode != 0 and "mesh: data*fsdp*tensor = [1, 4, 2] needs 8 devices" in out.stderr
  assert "Traceback" not in out.stderr


def test_cli_takes_no_shadow_flags():
  out = _cli("--config=configs/geneval.py:htgrpo,tiny", "--topology=v5e:2x2", "--batch=8", timeout=300)
  assert out.returncode != 0 and "batch" in out.stderr


def _readme_aot_lines() -> list[str]:
  text = open(os.path.join(REPO, "README.md")).read().replace("\\\n", " ")
  return sorted(
      {m.group(1).split("#")[0].strip() for m in re.finditer(r"python launch/aot_compile\.py (--config[^\n`]*)", text)}
  )


def parse_cli(argv: list[str]):
  """(config, topology) that launch/aot_compile.py gets from ``argv``, parsed in-process (config_flags
  defines the --config.* override flags from the --config file it finds in sys.argv)."""
  from absl import flags
  from ml_collections import config_flags

  argv = [SCRIPT, *argv]
  saved, sys.argv = sys.argv, argv
  try:
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True)
    topology = flags.DEFINE_string("topology", None, "", flag_values=fv)
    flags.DEFINE_list("programs", [], "", flag_values=fv)
    flags.DEFINE_string("output", None, "", flag_values=fv)
    fv(argv)
    return holder.value, topology.value
  finally:
    sys.argv = saved


@pytest.mark.parametrize("line", _readme_aot_lines())
def test_documented_aot_command_lines_parse_and_prepare(line, monkeypatch):
  """Every README `launch/aot_compile.py --config...` line names a config, overrides and a slice the
  trainer's checks accept (compiling them is the README table's job: minutes each)."""
  monkeypatch.chdir(REPO)
  config, topology = parse_cli(shlex.split(line))
  t = aot.prepare(config, topology, log=lambda _: None)
  assert t.mesh.devices.size == aot.topology_devices(topology).size


def test_lora_train_step_holds_the_adapters_state_and_one_frozen_base(compiled):
  """LoRA: the state is the adapters + their Adam moments + the frozen base once (no reference
  copy), so the train step's arguments shrink by about the reference's and the moments' share."""
  target, (_, full) = compiled
  lora_t, (lora_step,) = aot.compile_all(tiny_config(**{"model.lora.rank": 4}), "v5e:2x2", ("train_step",))
  state, _ = aot.abstract_state(lora_t)
  assert state.ref_params is None and state.frozen is not None
  n_base, n_adapters = _nbytes(state.frozen), _nbytes(state.params)
  assert n_adapters < n_base and _nbytes(state.opt_state) <= 2 * n_adapters + 64
  assert lora_step.fits and lora_step.argument_bytes < full.argument_bytes
  full_state, _ = aot.abstract_state(target)
  saved = _nbytes(full_state) - _nbytes(state)  # the reference copy and the moments, minus adapters'
  assert saved > 2 * n_base
  print(f"train step arguments/chip: full {full.argument_bytes} B, LoRA r4 {lora_step.argument_bytes} B")


def test_a_program_xla_refuses_for_hbm_is_reported_not_raised():
  e = aot.DoesNotFit(
      "train_step",
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
      "required for HLO temporaries (24.88G) exceeds available HBM (15.75G).\nmore",
  )
  assert (e.temp_gib, e.hbm_gib) == (24.88, 15.75) and "\n" not in str(e)


def test_cli_rows_of_refused_programs():
  """launch/aot_compile.py's table rows for programs XLA refused (run in a subprocess: the script
  defines its flags on absl's global registry): their rows (the sketch batch for 'sketch'),
  '> temps' and 'NO'."""
  code = """if True:
    import sys
    sys.path.insert(0, "launch")
    # config_flags finds the --config file in sys.argv when the flag is defined (at import).
    sys.argv = ["aot_compile.py", "--config=configs/geneval.py:htgrpo,tiny", "--topology=v5e:2x2",
                "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                "--config.sampler.share_sketch=True", "--config.rl.num_sketches=2"]
    import aot_compile as cli
    from htgrpo_jax import aot
    cli.flags.FLAGS(sys.argv)
    t = aot.prepare(cli._CONFIG.value, "v5e:2x2", log=lambda _: None)
    print(t.plan.batch_size, t.plan.sketch_rows)
    for program in ("train_step", "sketch"):
      print(cli.refused_row(t, aot.DoesNotFit(program, "temporaries (24.88G) exceeds available HBM (15.75G)")))
  """
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  sizes, *rows = out.stdout.strip().splitlines()[-3:]
  batch, sketch_rows = (int(v) for v in sizes.split())
  assert sketch_rows != batch
  for program, n, row in zip(("train_step", "sketch"), (batch, sketch_rows), rows):
    assert row.startswith(f"| shapes | v5e:2x2 | 1,2,2 | {n} | "), row
    assert f"| {program} | > 24.88 (temps) | 15.75 | NO | - | - |" in row, row
