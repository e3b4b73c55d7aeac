"""A LoRA run of the tiny ShapeEval config: its checkpoints hold the adapters and their optimizer
state only (never the frozen base), and a stopped and resumed run is bit-identical."""

import json
import os

import jax
import numpy as np
import pytest

from htgrpo_jax import checkpoint, pretrain, trainer
from tests.helpers.configs import tiny_config

LORA = {"model.lora.rank": 4, "model.lora.alpha": 8.0, "model.lora.dropout": 0.05}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("lora_trainer")


@pytest.fixture(scope="module")
def lora_run(root):
  return trainer.train(tiny_config(root, "lora", **LORA), log=lambda s: None)


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_checkpoints_hold_the_adapters_and_their_moments_only(lora_run, root):
  state = lora_run["state"]
  base = pretrain.load_params(str(root / "base" / "params"), checkpoint.abstract_like(state.frozen))
  # The frozen base is the pretrained base, bit for bit, after 4 updates.
  for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(base)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert state.ref_params is None
  step_dir = os.path.join(lora_run["workdir"], "checkpoints", "4")
  with open(os.path.join(step_dir, "manifest", "metadata")) as f:
    leaves = json.load(f)["leaves"]
  assert leaves and not [k for k in leaves if k.startswith((".frozen", ".ref_params"))]
  params = [k for k in leaves if k.startswith(".params")]
  assert params and all(k.endswith(("_a']", "_b']")) for k in params), params
  # Everything saved is adapter-sized: the adapters, Adam's two moments of them and counters.
  n = lambda keys: sum(int(np.prod(leaves[k]["shape"])) for k in keys)
  n_adapters, n_base = n(params), sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base))
  assert n(leaves) <= 3 * n_adapters + 8 < n_base
  on_disk, base_disk = _dir_bytes(os.path.join(step_dir, "state")), _dir_bytes(root / "base" / "params")
  print(
      f"LoRA checkpoint: {n(leaves)} scalars ({n_adapters} adapter params), state/ {on_disk} bytes on "
      f"disk; the frozen base: {n_base} params, {base_disk} bytes (not written)"
  )


@pytest.mark.slow
def test_stopped_and_resumed_lora_run_matches_uninterrupted(lora_run, root):
  cfg = tiny_config(root, "lora_resumed", **LORA)
  first = trainer.train(cfg, log=lambda s: None, stop_after=3)  # checkpoints at 2 and 3
  assert first["step"] == 3
  second = trainer.train(cfg, log=lambda s: None)
  assert second["step"] == 4
  a, b = lora_run["state"], second["state"]
  for x, y in zip(jax.tree.leaves((a.params, a.opt_state, a.step)), jax.tree.leaves((b.params, b.opt_state, b.step))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert lora_run["history"] == second["history"]


@pytest.mark.slow
def test_evaluating_a_lora_checkpoint_restores_its_adapters_over_the_base(lora_run, root):
  out = trainer.evaluate_checkpoint(
      tiny_config(root, "lora", **LORA), which="latest", out_dir=str(root / "lora_eval"), log=lambda s: None
  )
  assert out["name"] == "step4" and 0.0 <= out["scores"]["overall"] <= 1.0
  got, want = out["params"], lora_run["state"]
  for x, y in zip(jax.tree.leaves((got.adapters, got.base)), jax.tree.leaves((want.params, want.frozen))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
