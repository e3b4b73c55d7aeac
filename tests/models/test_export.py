"""HF export: ``convert.save_hf`` is the converter's exact inverse (keys, shapes, bits, shards), checked
against safetensors' own torch reader on a checkpoint written by torch."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from htgrpo_jax.models import convert
from tests.helpers.llada_checkpoint import CFG, write_llada_checkpoint


@pytest.mark.parametrize("scan", [True, False])
def test_save_hf_writes_back_the_checkpoint_it_was_converted_from(tmp_path, scan):
  cfg = dataclasses.replace(CFG, scan_layers=scan)
  sd = write_llada_checkpoint(tmp_path / "hf", cfg)
  params = convert.load_llada_params(str(tmp_path / "hf"), cfg)
  files = convert.save_hf(params, cfg, str(tmp_path / "out"), max_shard_bytes=40_000)
  assert len(files) > 2  # several shards, each under the limit except a single larger tensor
  with open(tmp_path / "out" / convert.INDEX_FILE) as f:
    index = json.load(f)
  assert set(index["weight_map"]) == set(sd) and set(index["weight_map"].values()) == set(files)
  back = {}
  for name in files:
    back.update(load_file(str(tmp_path / "out" / name)))  # safetensors' own (torch) reader
  assert set(back) == set(sd)
  for k, t in sd.items():
    assert back[k].dtype == torch.float32 and torch.equal(back[k], t), k
  assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in sd.values())

  convert.save_hf(params, cfg, str(tmp_path / "bf16"), dtype="bfloat16")
  bf = {}
  for name in os.listdir(tmp_path / "bf16"):
    if name.endswith(".safetensors"):
      bf.update(load_file(str(tmp_path / "bf16" / name)))
  for k, t in sd.items():
    assert bf[k].dtype == torch.bfloat16 and torch.equal(bf[k], t.to(torch.bfloat16)), k
  # And the converter reads the export: the same params.
  again = convert.load_llada_params(str(tmp_path / "out"), cfg)
  for path, x in convert.traverse_util.flatten_dict(params).items():
    np.testing.assert_array_equal(np.asarray(convert.traverse_util.flatten_dict(again)[path]), np.asarray(x))
