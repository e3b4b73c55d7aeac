"""The 8B path with torch absent: in processes where ``import torch`` fails (the import system cannot
find it, as on a TPU VM without the [torch] extra), launch/convert_checkpoint.py converts a BF16
LLaDA checkpoint in the HF layout (DiMOO preset at toy size) and configs/lumina_dimoo_geneval.py
trains two steps on it with a VQ-GAN decoder read from safetensors and a reward server. The
checkpoints are written here, with torch, in the test process; only the reading side is torch-free."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # only to *write* the toy checkpoints

from htgrpo_jax.models import convert, llada  # noqa: E402

from tests.helpers import local_server  # noqa: E402
from tests.helpers.configs import T2I_PROMPTS as PROMPTS  # noqa: E402
from tests.helpers.configs import TINY_LLADA as TINY  # noqa: E402
from tests.helpers.llada_checkpoint import write_llada_checkpoint  # noqa: E402
from tests.helpers.torch_vq_reference import TVQGAN, VQG, randomize, write_ckpt  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Replaces the path finder so that torch (and torch.*) is not found: `import torch` raises
# ModuleNotFoundError and importlib.util.find_spec("torch") is None, which is what libraries that
# probe for torch (transformers, safetensors) see on a machine without it.
BLOCK_TORCH = textwrap.dedent("""
    import importlib.machinery, sys
    class _NoTorchFinder(importlib.machinery.PathFinder):
      @classmethod
      def find_spec(cls, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
          return None
        return super().find_spec(name, path, target)
    sys.meta_path[:] = [_NoTorchFinder if f is importlib.machinery.PathFinder else f
                        for f in sys.meta_path]
    assert "torch" not in sys.modules
    try:
      import torch
    except ModuleNotFoundError:
      pass
    else:
      raise AssertionError("torch is still importable")
    import importlib.util
    assert importlib.util.find_spec("torch") is None
    """)

TRAIN = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import jax
    from htgrpo_jax import trainer
    from tests.helpers.configs import toy_dimoo_config
    args = json.loads(sys.argv[1])
    c = toy_dimoo_config(workdir=args["workdir"], prompts=(args["prompts"], args["prompts"]),
                         url=args["url"], tokenizer=args["tokenizer"],
                         checkpoint=args["checkpoint"], vq=args["vq"])
    out = trainer.train(c, log=lambda s: None)
    finite = all(np.isfinite(v).all() for v in jax.tree.leaves(jax.device_get(out["params"])))
    print("RESULT", json.dumps({"step": out["step"], "finite": bool(finite),
                                "torch_loaded": sorted(m for m in sys.modules if m.split(".")[0] == "torch")}))
    """)


def _run_without_torch(code, *args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  out = subprocess.run(
      [sys.executable, "-c", BLOCK_TORCH + code, *args],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return out


@pytest.mark.slow  # ~45 s; the DiMOO path with torch present runs by default (test_t2i_task.py)
def test_convert_and_train_the_dimoo_path_without_torch(tmp_path, word_tokenizer_dir, server):
  # Written with torch: an HF-layout BF16 backbone (two shards + index), a VQ-GAN, prompts.
  model_cfg = llada.get_config("lumina_dimoo_8b", **TINY)
  write_llada_checkpoint(tmp_path / "hf", model_cfg, dtype=torch.bfloat16)
  vq = write_ckpt(tmp_path / "vqvae.safetensors", randomize(TVQGAN(VQG), seed=7))
  with open(tmp_path / "prompts.jsonl", "w") as f:
    for text, tag in PROMPTS:
      f.write(json.dumps({"prompt": text, "tag": tag}) + "\n")

  # 1. The converter CLI, torch blocked.
  orbax_dir = tmp_path / "dimoo_orbax"
  argv = [
      "launch/convert_checkpoint.py",
      "--preset=lumina_dimoo_8b",
      f"--hf_dir={tmp_path / 'hf'}",
      f"--out_dir={orbax_dir}",
      "--tensor=2",
  ] + [f"--override={k}={v}" for k, v in TINY.items()]
  out = _run_without_torch(
      "import runpy, sys\n"
      f"sys.argv = {argv!r}\n"
      "try:\n"
      "  runpy.run_path('launch/convert_checkpoint.py', run_name='__main__')\n"
      "except SystemExit as e:\n"
      "  assert not e.code, e.code\n"
      "assert not [m for m in sys.modules if m.split('.')[0] == 'torch']\n"
  )
  assert f"wrote {orbax_dir}" in out.stdout

  # The Orbax params equal the BF16 tensors, read here independently through torch.
  import jax
  from safetensors.torch import load_file

  ref = convert.load_llada_params(str(tmp_path / "hf"), model_cfg)
  restored = convert.restore_params(
      str(orbax_dir), jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), ref)
  )
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, ref)
  sd = {}
  for name in sorted(os.listdir(tmp_path / "hf")):
    if name.endswith(".safetensors"):
      sd.update(load_file(str(tmp_path / "hf" / name)))
  np.testing.assert_array_equal(np.asarray(restored["wte"]), sd["model.transformer.wte.weight"].float().numpy())
  q0 = sd["model.transformer.blocks.0.q_proj.weight"].float().numpy()
  q = np.asarray(restored["blocks"]["q_proj"][0] if model_cfg.scan_layers else restored["block_0"]["q_proj"])
  np.testing.assert_array_equal(q.reshape(q.shape[0], -1), q0.T)

  # 2. Two RL steps of the DiMOO config on the converted backbone, torch blocked.
  args = dict(
      repo=REPO,
      workdir=str(tmp_path / "run"),
      prompts=str(tmp_path / "prompts.jsonl"),
      url=local_server.url(server),
      tokenizer=word_tokenizer_dir,
      checkpoint=str(orbax_dir),
      vq=vq,
  )
  out = _run_without_torch(TRAIN, json.dumps(args))
  result = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
  assert result == {"step": 2, "finite": True, "torch_loaded": []}
  paths = [r[0] for r in server.requests]
  assert paths.count("/reward") >= 2 and "/strict" in paths
  for name in ("results.md", "eval_step00002.md", "metrics.jsonl"):
    assert os.path.exists(tmp_path / "run" / name), name
