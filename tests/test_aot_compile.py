"""The AOT pre-flight compiles the sampler and the train step for a TPU topology description on CPU."""
import dataclasses
import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu")

from htgrpo_jax import aot, rl  # noqa: E402
from htgrpo_jax.sampling import SamplerConfig  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup():
  """'tiny' LLaDA on a 4x4-slot embedded layout, v5e 2x2 (4 chips) as data=1, fsdp=2, tensor=2."""
  cfg, lay = aot.build_model("tiny", embedded_grid=(4, 4), embedded_codebook=16, embedded_prompt_length=4,
                             remat="full", scan_layers=True)
  return aot.Setup(
      model_cfg=cfg, layout=lay,
      rl=rl.preset("htgrpo", group_size=2, num_sampler_steps=4, n_global=1, n_struct=1, n_refine=1),
      sampler=SamplerConfig(num_steps=4, sketch_steps=2, cfg_scale=2.0),
      topology="v5e:2x2", mesh_shape=(1, 2, 2), batch=8, micro_batch=2)


def _check(report, program, rows):
  assert report.program == program and report.rows == rows
  assert report.argument_bytes > 0 and report.temp_bytes > 0 and report.total_bytes > 0
  assert report.xla_flops > 0 and report.model_flops > 0 and report.compile_s > 0
  assert report.device_kind == "TPU v5 lite" and report.hbm_gib == 16.0 and report.fits


def test_train_step_and_sampler_compile_with_positive_memory_and_flops(setup):
  reports = aot.compile_all(setup, ("sampler", "train_step"))
  _check(reports[0], "sampler", 8)
  _check(reports[1], "train_step", 8)
  # The donated state comes back in place: the aliased bytes are the state's (params, Adam, counters).
  assert reports[1].alias_bytes > 0
  row = aot.markdown_row(setup, reports[1])
  assert row.startswith("| v5e:2x2 | 1,2,2 | 8 | 2 | full+scan | train_step |") and "| yes |" in row
  assert row.count("|") == aot.TABLE_HEADER.splitlines()[0].count("|")


def test_shared_sketch_compiles_on_prompt_rows(setup):
  # batch 8 / G 2 = 4 prompts, a multiple of data*fsdp = 2.
  report = aot.compile_program(dataclasses.replace(setup, share_sketch=True), "sketch")
  _check(report, "sketch", 4)


def test_model_flops_count_every_pass(setup):
  f = aot.forward_flops(setup.model_cfg, setup.layout, setup.batch)
  # 'htgrpo' with the structure context: 2 distinct canvases x (old + ref) + 3 x K=3 forward-equivalents.
  assert aot.program_model_flops(setup, "train_step", setup.batch) == pytest.approx((4 + 9) * f)
  # Sampler: T steps of a CFG forward on 2B rows.
  assert aot.program_model_flops(setup, "sampler", setup.batch) == pytest.approx(4 * 2 * f)


@pytest.mark.parametrize("change, field", [
    (dict(topology="v9z:2x2"), "topology="),
    (dict(topology="v5e"), "topology="),
    (dict(mesh_shape=(1, 2, 4)), "mesh_shape="),
    (dict(mesh_shape=(1, 0, 4)), "mesh_shape="),
    (dict(batch=5), "batch="),                    # not a multiple of data*fsdp = 2
    (dict(batch=6, micro_batch=0,                 # a multiple of data*fsdp, not of group_size = 4
          rl=rl.preset("htgrpo", group_size=4, num_sampler_steps=4, n_global=1, n_struct=1, n_refine=1)),
     "group_size"),
    (dict(batch=6), "micro_batch="),              # 2 per device x 2 = 4 rows do not divide 6
    (dict(micro_batch=3), "micro_batch="),        # 3 x 2 = 6 rows do not divide 8
    (dict(micro_batch=-1), "micro_batch="),
    (dict(ref_dtype="float16"), "ref_dtype="),
    (dict(share_sketch=True, batch=2), "batch="),  # 1 prompt over data*fsdp = 2
])
def test_bad_setup_raises_naming_the_field(setup, change, field):
  bad = dataclasses.replace(setup, **change)
  with pytest.raises(ValueError, match=field):
    aot.compile_all(bad)


def test_unknown_program_and_model_raise():
  with pytest.raises(ValueError, match="programs="):
    aot.compile_all(None, ("forward",))
  with pytest.raises(ValueError, match="model="):
    aot.build_model("gpt9")
  with pytest.raises(ValueError, match="layout="):
    aot.build_model("tiny", layout="sdxl")


def test_cli_reads_the_training_config_and_prints_the_table():
  """launch/aot_compile.py --config: the tiny ShapeEval run's own batch, G, K and sampler."""
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "aot_compile.py"),
       "--config=" + os.path.join(REPO, "configs", "geneval.py") + ":htgrpo,tiny",
       "--topology=v5e:2x2", "--mesh=1,2,2", "--what=train_step"],
      capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [l for l in out.stdout.splitlines() if l.startswith("| v5e:2x2")]
  # tiny config: 4 prompts x G=4 = 16 images, whole batch per step -> 16 / (data*fsdp=2) per device.
  assert len(rows) == 1 and rows[0].startswith("| v5e:2x2 | 1,2,2 | 16 | 8 |") and "| yes |" in rows[0]
  assert "K=3" in out.stdout


def test_cli_names_a_mesh_that_does_not_fit_the_slice():
  out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "aot_compile.py"), "--model=tiny",
                        "--topology=v5e:2x2", "--mesh=1,4,2"], capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "mesh_shape=(1, 4, 2)" in out.stderr
