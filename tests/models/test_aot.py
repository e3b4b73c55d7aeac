"""The sharded MMaDA-shaped forward (bench/aot_forward.py) and the MMaDA training config's sampler
(htgrpo_jax.aot, the launch/aot_compile.py driver) AOT-compile for a TPU topology description on
this CPU box."""

import importlib.util
import os

import pytest

from htgrpo_jax import aot, tasks
from htgrpo_jax.models import llada

from tests.helpers.tpu import require_libtpu  # noqa: E402

require_libtpu()
_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "aot_forward.py")
_spec = importlib.util.spec_from_file_location("aot_forward", _PATH)
aot_forward = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aot_forward)


def _compile(n_layers, topology, fsdp, tensor, batch):
  cfg = llada.get_config("mmada_8b", n_layers=n_layers)
  mesh = aot_forward.topology_mesh(topology, fsdp, tensor)
  compiled, _ = aot_forward.compile_forward(cfg, mesh, batch)
  return cfg, compiled.memory_analysis()


def test_reduced_depth_mmada_forward_compiles_for_v5p_4x4x4():
  # Full MMaDA widths and vocab, 2 layers (a 64-chip topology compiles faster than a 4-chip one).
  cfg, mem = _compile(2, "v5p:4x4x4", fsdp=16, tensor=4, batch=16)
  # fp32 params split 64 ways (fsdp x tensor): arguments ~ params / 64 per device, not the whole model.
  per_device_params = cfg.num_params() * 4 / 64
  assert 0.9 * per_device_params < mem.argument_size_in_bytes < 1.2 * per_device_params
  # Only the codebook slice of the logits comes out: [16, 1024, 8192] fp32 over 64 devices.
  assert mem.output_size_in_bytes <= 1.1 * 16 * 1024 * 8192 * 4 / 64


@pytest.mark.slow
def test_reduced_depth_mmada_config_sampler_splits_the_params_over_the_slice():
  """configs/mmada_geneval.py as launch/aot_compile.py takes it (fsdp 16 x tensor 4 on 64 chips, 128
  images, CFG), at 2 layers: each chip holds 1/64 of the fp32 params, not the whole model."""
  config = tasks.load_config_file("configs/mmada_geneval.py")
  config.model.overrides.n_layers = 2
  t = aot.prepare(config, "v5p:4x4x4", log=lambda _: None)
  report = aot.compile_program(t, "sampler")
  per_device_params = t.model_cfg.num_params() * 4 / 64
  assert 0.9 * per_device_params < report.argument_bytes < 1.2 * per_device_params
  # Out comes the B x N record (codes, steps, entropies, log-probs; 4 bytes each) split over
  # data*fsdp = 16 and repeated over tensor, not the [B, N, 8192] logits.
  assert 128 * 1024 * 4 * 4 / 16 <= report.output_bytes <= 1.1 * 128 * 1024 * 4 * 4 / 16
  assert report.rows == 128 and report.fits


@pytest.mark.slow
def test_full_mmada_8b_forward_compiles_for_v5p_4x4x4():
  cfg, mem = _compile(32, "v5p:4x4x4", fsdp=16, tensor=4, batch=64)
  assert mem.argument_size_in_bytes < cfg.num_params() * 4 / 64 * 1.2
  assert mem.argument_size_in_bytes + mem.temp_size_in_bytes < 95 * 2**30  # fits a v5p chip
