"""Bad input files: prompt files are UTF-8 whatever the locale and invalid bytes are named by file
and line; the converters refuse integer/bool tensors and NaN/inf weights by tensor name, and name
the file of a truncated safetensors shard."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from htgrpo_jax import tasks
from htgrpo_jax.models import convert, llada
from htgrpo_jax.models.vq import convert as vq_convert
from htgrpo_jax.models.vq import vqgan

CFG = llada.get_config("tiny", vocab_size=64, d_model=16, n_layers=2, n_heads=2, mlp_hidden=24)
VQG = vqgan.PRESETS["tiny"]


def test_prompt_file_is_read_as_utf8_under_an_ascii_locale(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_bytes(json.dumps({"prompt": "a photo of a café", "tag": "x"}, ensure_ascii=False).encode("utf-8") + b"\n")
  code = (
      "import sys; from htgrpo_jax import tasks; "
      "print(ascii(tasks.read_prompt_file(sys.argv[1], 'world.train_prompts')[0].text))"
  )
  env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == ascii("a photo of a café")


def test_invalid_utf8_names_file_and_line(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_bytes(b'{"prompt": "a cat"}\n\n{"prompt": "a \xff dog"}\n')
  with pytest.raises(ValueError, match=r"world.eval_prompts: .*p\.jsonl line 3 is not valid UTF-8"):
    tasks.read_prompt_file(str(path), "world.eval_prompts")


def test_utf8_bom_is_accepted(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_bytes(b'\xef\xbb\xbf{"prompt": "a cat"}\n')
  assert tasks.read_prompt_file(str(path), "k")[0].text == "a cat"


# ------------------------------------------------------------------------------------------------
# Converters


def _llada_tensors(seed=0):
  rng = np.random.default_rng(seed)
  shapes = {k: s for keys, s, _ in convert.param_map(CFG).values() for k in keys}
  return {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in shapes.items()}


def _write_llada(path, tensors):
  os.makedirs(path, exist_ok=True)
  keys = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
  for name, ks in shards.items():
    save_file({k: tensors[k] for k in ks}, os.path.join(path, name))
  with open(os.path.join(path, convert.INDEX_FILE), "w") as f:
    json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
  return shards


KEY = "model.transformer.blocks.1.q_proj.weight"


def test_clean_llada_checkpoint_loads(tmp_path):
  _write_llada(tmp_path / "ok", _llada_tensors())
  params = convert.load_llada_params(str(tmp_path / "ok"), CFG)
  assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(params))


@pytest.mark.parametrize(
    "case,match",
    [
        ("int", r"int32.*not a floating"),
        ("bool", r"bool.*not a floating"),
        ("nan", r"non-finite.*NaN"),
        ("inf", r"non-finite"),
    ],
)
def test_llada_converter_refuses_bad_values_by_tensor(tmp_path, case, match):
  t = _llada_tensors()
  if case == "int":
    t[KEY] = np.ones(t[KEY].shape, np.int32)
  elif case == "bool":
    t[KEY] = np.ones(t[KEY].shape, np.bool_)
  else:
    t[KEY] = t[KEY].copy()
    t[KEY][1, 2] = np.nan if case == "nan" else np.inf
  _write_llada(tmp_path / case, t)
  with pytest.raises(ValueError, match=f"tensor {KEY}.*{match}"):
    convert.load_llada_params(str(tmp_path / case), CFG)


def test_truncated_llada_shard_names_the_file(tmp_path):
  shards = _write_llada(tmp_path / "trunc", _llada_tensors())
  shard = str(tmp_path / "trunc" / sorted(shards)[1])
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) - 100)
  with pytest.raises(ValueError, match=f"{shard}.*(truncated|unreadable)"):
    convert.load_llada_params(str(tmp_path / "trunc"), CFG)


def test_truncated_single_file_checkpoint_names_the_file(tmp_path):
  d = tmp_path / "single"
  os.makedirs(d)
  save_file(_llada_tensors(), str(d / convert.SINGLE_FILE))
  with open(d / convert.SINGLE_FILE, "r+b") as f:
    f.truncate(50)
  with pytest.raises(ValueError, match=str(d / convert.SINGLE_FILE)):
    convert.load_llada_params(str(d), CFG)


def _vq_tensors():
  rng = np.random.default_rng(1)
  return {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s, _ in vq_convert.vqgan_param_map(VQG).values()}


@pytest.mark.parametrize("case", ["int", "nan"])
def test_vq_converter_refuses_bad_values_by_tensor(tmp_path, case):
  t = _vq_tensors()
  key = sorted(t)[3]
  t[key] = (
      np.ones(t[key].shape, np.int64)
      if case == "int"
      else np.where(np.arange(t[key].size).reshape(t[key].shape) == 0, np.nan, t[key])
  )
  save_file(t, str(tmp_path / "vq.safetensors"))
  with pytest.raises(ValueError, match=f"tensor {key}.*(not a floating|non-finite)"):
    vq_convert.load_vqgan_params(str(tmp_path / "vq.safetensors"), VQG)


def test_truncated_vq_file_names_the_file(tmp_path):
  path = str(tmp_path / "vq.safetensors")
  save_file(_vq_tensors(), path)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(ValueError, match=path):
    vq_convert.load_vqgan_params(path, VQG)
