"""Import layering: the shared contracts sit at the bottom, the algorithm package is not a base layer.

* ``htgrpo_jax/contracts.py`` is a leaf: it imports nothing from htgrpo_jax and, at run time, only
  jax, numpy, chex, flax.struct and the standard library;
* worlds/, models/, sampling/, rewards/, pretrain.py, evaluate.py and tasks.py take the contracts
  from there, not from ``rl/`` (statically, function-level imports included, and in a fresh
  interpreter's ``sys.modules``); tasks.py does not reach into the reporting module for
  ``EvalPrompt``;
* the old spellings (``rl.Rollout``, ``rl.TrainState``, ``evaluate.EvalPrompt``, ...) name the
  same objects, and RL and pretraining share one ``TrainState``;
* loading any ``configs/*.py`` file imports no JAX.
"""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "htgrpo_jax")

# Modules that sit above the contracts but below the algorithm package.
BELOW_RL = ("worlds", "models", "sampling", "rewards", "pretrain.py", "evaluate.py", "tasks.py")
CONTRACT_IMPORTS = {
    "__future__",
    "dataclasses",
    "typing",
    "chex",
    "jax",
    "jax.numpy",
    "numpy",
    "flax",
    "optax",
}  # optax: the one optimizer factory lives beside TrainState


def _run(code: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )


def _files(entry: str) -> list[str]:
  path = os.path.join(PACKAGE, entry)
  if path.endswith(".py"):
    return [path]
  return sorted(glob.glob(os.path.join(path, "**", "*.py"), recursive=True))


def _imported_names(tree: ast.AST) -> set[str]:
  """Absolute module names a file imports anywhere (``from a import b`` gives a and a.b)."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      assert not node.level, "htgrpo_jax uses absolute imports only"
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


def _is_type_checking_block(node: ast.stmt) -> bool:
  return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def test_contracts_is_a_leaf_module():
  tree = ast.parse(open(os.path.join(PACKAGE, "contracts.py")).read())
  assert not {n for n in _imported_names(tree) if n.split(".")[0] == "htgrpo_jax"}, "contracts.py imports htgrpo_jax"
  # What runs at import time (``if TYPE_CHECKING:`` blocks are for annotations only).
  modules, flax_names = set(), set()
  for node in ast.walk(ast.Module(body=[n for n in tree.body if not _is_type_checking_block(n)], type_ignores=[])):
    if isinstance(node, ast.Import):
      modules.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      modules.add(node.module)
      if node.module == "flax":
        flax_names.update(a.name for a in node.names)
  assert modules <= CONTRACT_IMPORTS, f"contracts.py imports {sorted(modules - CONTRACT_IMPORTS)}"
  assert flax_names <= {"struct"}, f"contracts.py imports flax's {sorted(flax_names - {'struct'})}"

  out = _run("""\
      import sys
      import htgrpo_jax.contracts
      print(sorted(m for m in sys.modules if m.startswith("htgrpo_jax")))
      """)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == "['htgrpo_jax', 'htgrpo_jax.contracts']", out.stdout


@pytest.mark.parametrize("entry", BELOW_RL)
def test_lower_layers_do_not_import_rl(entry):
  files = _files(entry)
  assert files, entry
  for path in files:
    names = _imported_names(ast.parse(open(path).read()))
    bad = sorted(n for n in names if n == "htgrpo_jax.rl" or n.startswith("htgrpo_jax.rl."))
    assert not bad, f"{os.path.relpath(path, REPO)} imports {bad}: take the contract from htgrpo_jax.contracts"


def test_tasks_does_not_import_the_reporting_module():
  names = _imported_names(ast.parse(open(os.path.join(PACKAGE, "tasks.py")).read()))
  assert "htgrpo_jax.evaluate" not in names and "htgrpo_jax.evaluate.EvalPrompt" not in names


def test_importing_the_lower_layers_leaves_rl_unimported():
  out = _run("""\
      import sys
      import htgrpo_jax.worlds, htgrpo_jax.models, htgrpo_jax.sampling, htgrpo_jax.pretrain
      import htgrpo_jax.worlds.shapeeval.dataset, htgrpo_jax.worlds.shapeeval.codebook
      import htgrpo_jax.worlds.shapeeval.text_tokenizer, htgrpo_jax.worlds.shapeeval.scenes
      import htgrpo_jax.worlds.shapeeval.grammar, htgrpo_jax.worlds.shapeeval.verifier
      import htgrpo_jax.models.layouts, htgrpo_jax.models.llada, htgrpo_jax.models.policy
      import htgrpo_jax.models.vq
      import htgrpo_jax.rewards, htgrpo_jax.rewards.remote
      import htgrpo_jax.evaluate, htgrpo_jax.tasks, htgrpo_jax.worlds.shapeeval.task
      htgrpo_jax.tasks.load_worlds()
      print(sorted(m for m in sys.modules if m.startswith("htgrpo_jax.")))
      """)
  assert out.returncode == 0, out.stderr[-3000:]
  loaded = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 (our own subprocess's list)
  assert "htgrpo_jax.contracts" in loaded and "htgrpo_jax.pretrain" in loaded, loaded
  leaked = [m for m in loaded if m == "htgrpo_jax.rl" or m.startswith("htgrpo_jax.rl.")]
  assert not leaked, f"importing worlds/models/sampling/pretrain/rewards/evaluate/tasks imported {leaked}"


def test_old_names_are_the_contracts():
  from htgrpo_jax import contracts, evaluate, pretrain, rewards, rl, tasks
  from htgrpo_jax.config_util import load_config_file
  from htgrpo_jax.rewards import base
  from htgrpo_jax.rl import rollout, train_step

  assert rl.MASK == rollout.MASK == contracts.MASK == -1
  assert rl.CanvasLogitsFn is rollout.CanvasLogitsFn is contracts.CanvasLogitsFn
  assert rl.Rollout is rollout.Rollout is contracts.Rollout
  # One learner state for the RL update and for pretraining.
  assert rl.TrainState is train_step.TrainState is pretrain.TrainState is contracts.TrainState
  assert evaluate.EvalPrompt is contracts.EvalPrompt
  assert rewards.RewardFn is base.RewardFn is contracts.RewardFn
  assert tasks.load_config_file is load_config_file


def test_sample_record_fills_the_contract_rollout():
  import jax.numpy as jnp

  from htgrpo_jax import contracts, rl
  from htgrpo_jax.sampling import SampleRecord

  z = jnp.zeros((2, 3), jnp.int32)
  rec = SampleRecord(
      image_tokens=z, commit_step=z, commit_entropy=z.astype(jnp.float32), commit_logp=z.astype(jnp.float32)
  )
  ro = rec.to_rollout(jnp.zeros((2, 4), jnp.int32), jnp.zeros((2,), jnp.float32))
  assert type(ro) is contracts.Rollout and isinstance(ro, rl.Rollout)
  ro.validate()


def test_train_state_keeps_the_rl_checkpoint_layout():
  """RL checkpoints store this pytree by field name, in this order; pretraining keeps no reference."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  import optax

  from htgrpo_jax.contracts import TrainState

  # ``frozen`` (a LoRA run's base) comes last and is never checkpointed (``without_frozen``).
  assert [f.name for f in dataclasses.fields(TrainState)] == [
      "step",
      "params",
      "opt_state",
      "ref_params",
      "skipped",
      "frozen",
  ]
  params = {"w": jnp.ones((2,), jnp.float32)}
  with_ref = TrainState.create(params, optax.sgd(0.1))
  keys = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(with_ref)[0]]
  assert keys == [".step", ".params['w']", ".ref_params['w']", ".skipped"], keys
  no_ref = TrainState.create(params, optax.sgd(0.1), with_reference=False)
  assert no_ref.ref_params is None and int(no_ref.step) == 0 and int(no_ref.skipped) == 0
  assert with_ref.ref_params["w"] is not params["w"]  # a copy: donation cannot alias
  lora = TrainState.create({"a": jnp.zeros((2,), jnp.float32)}, optax.sgd(0.1), frozen=params)
  assert lora.ref_params is None and lora.frozen is params
  keys = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(lora.without_frozen())[0]]
  assert keys == [".step", ".params['a']", ".skipped"], keys


CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.py")))


def test_every_config_is_checked():
  assert {"geneval.py", "mmada_geneval.py", "lumina_dimoo_geneval.py", "pretrain_shapes.py"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_loading_a_config_imports_no_jax(name):
  out = _run(f"""\
      import sys
      from htgrpo_jax.config_util import load_config_file
      cfg = load_config_file({os.path.join("configs", name)!r})
      assert len(cfg), "empty config"
      heavy = sorted(m for m in sys.modules
                     if m.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "grain", "tensorflow",
                                            "torch", "transformers", "PIL"))
      ours = sorted(m for m in sys.modules if m.startswith("htgrpo_jax."))
      print(heavy, ours)
      """)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == "[] ['htgrpo_jax.config_util']", f"{name}: {out.stdout.strip()}"
