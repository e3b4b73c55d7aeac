"""Packaging: the core install (no extras) carries `htgrpo_jax.rl` and `htgrpo_jax.sampling` alone.

* pyproject's core dependencies cover every third-party module that rl/ and sampling/ import,
  following their htgrpo_jax imports (static, by ``ast``);
* both packages import, and README's library snippet runs, with the trainer stack made absent
  (``sys.modules[name] = None``: ``import`` raises and ``importlib.util.find_spec`` says missing);
* slow: a fresh virtualenv with ``pip install <repo>`` and nothing else runs the snippet, and the
  trainer stack is not installed there.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "htgrpo_jax")

# What only the extras may bring (import names): the trainer, its worlds, converters, reporting.
TRAINER_STACK = (
    "tensorflow_datasets",
    "tensorflow",
    "transformers",
    "tokenizers",
    "grain",
    "array_record",
    "matplotlib",
    "tensorboardX",
    "ml_collections",
    "safetensors",
    "torch",
    "PIL",
    "tqdm",
)
# Core distribution name -> import name, for the ones that differ.
IMPORT_NAME = {"jax": "jax", "flax": "flax", "optax": "optax", "chex": "chex", "numpy": "numpy"}


def _core_requirements() -> set[str]:
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
  return {re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


def _module_file(module: str) -> str | None:
  """The source file of an htgrpo_jax module (a package's __init__.py), or None."""
  base = os.path.join(REPO, *module.split("."))
  for path in (base + ".py", os.path.join(base, "__init__.py")):
    if os.path.exists(path):
      return path
  return None


def _imports_of(path: str, module: str) -> set[str]:
  """Absolute names imported anywhere in a file (function-level imports included)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolve against the importing module
        pkg = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        for _ in range(node.level - 1):
          pkg = pkg.rpartition(".")[0]
        base = f"{pkg}.{node.module}" if node.module else pkg
      else:
        base = node.module
      out.add(base)
      out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
  return out


def _third_party_closure(roots: tuple[str, ...], seen: set[str] | None = None) -> dict[str, set[str]]:
  """Third-party top-level module -> the htgrpo_jax modules importing it, over the import closure
  (``seen`` collects the htgrpo_jax modules visited)."""
  seen = set() if seen is None else seen
  todo, found = list(roots), {}
  while todo:
    mod = todo.pop()
    if mod in seen:
      continue
    seen.add(mod)
    path = _module_file(mod)
    if path is None:
      continue
    if mod.count(".") >= 1:  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
      todo.append(mod.rpartition(".")[0])
    for name in _imports_of(path, mod):
      top = name.split(".")[0]
      if top == "htgrpo_jax":
        todo.append(name)
      elif top not in sys.stdlib_module_names and top != "__future__":
        found.setdefault(top, set()).add(mod)
  return found


def test_core_dependencies_cover_what_rl_and_sampling_import():
  found = _third_party_closure(("htgrpo_jax", "htgrpo_jax.rl", "htgrpo_jax.sampling"))
  core = {IMPORT_NAME.get(d, d.replace("-", "_")) for d in _core_requirements()}
  missing = {m: sorted(by) for m, by in found.items() if m not in core}
  assert not missing, f"rl/sampling import modules that the core install lacks: {missing}"
  heavy = sorted(set(found) & set(TRAINER_STACK))
  assert not heavy, f"rl/sampling import the trainer stack: {heavy}"
  assert not set(_core_requirements()) & {
      "transformers",
      "tensorflow-datasets",
      "grain",
      "matplotlib",
      "tensorboardx",
      "ml-collections",
      "torch",
  }


def test_rl_and_sampling_stay_off_the_models_and_the_trainer():
  # The layering README and docs/architecture.md promise: rl/ needs only itself, contracts.py and
  # parallel.py; sampling/ knows the contracts but not rl. Function-level imports count too.
  for roots, allowed in (
      (("htgrpo_jax.rl",), ("htgrpo_jax.rl", "htgrpo_jax.contracts", "htgrpo_jax.parallel")),
      (("htgrpo_jax.sampling",), ("htgrpo_jax.sampling", "htgrpo_jax.contracts", "htgrpo_jax.parallel")),
  ):
    seen = set()
    _third_party_closure(roots, seen)
    reached = {m for m in seen if _module_file(m)} - {"htgrpo_jax"}
    outside = sorted(m for m in reached if not any(m == a or m.startswith(a + ".") for a in allowed))
    assert not outside, f"{roots[0]} reaches {outside}"


def test_core_dependencies_are_ranges_not_pins():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
  pinned = [d for d in deps if "==" in d]
  assert not pinned, f"core dependencies must be version ranges, not exact pins: {pinned}"


_BLOCK = textwrap.dedent(f"""\
    import sys
    BLOCKED = {TRAINER_STACK!r}
    for name in BLOCKED:
      sys.modules[name] = None   # import raises ImportError; importlib.util.find_spec says absent
    """)


def _run_blocked(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-c", _BLOCK + code], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
  )


def test_rl_and_sampling_import_with_the_trainer_stack_absent():
  out = _run_blocked(textwrap.dedent("""\
      import htgrpo_jax
      import htgrpo_jax.rl, htgrpo_jax.sampling
      from htgrpo_jax import rl, sampling
      assert callable(rl.make_train_step) and callable(sampling.make_sampler)
      leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m] is not None)
      assert not leaked, leaked
      print("core imports ok")
      """))
  assert out.returncode == 0, out.stderr[-4000:]
  assert "core imports ok" in out.stdout


def readme_library_snippet() -> str:
  """The README's ```python block that uses ``from htgrpo_jax import rl``."""
  with open(os.path.join(REPO, "README.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
  snippets = [b for b in blocks if re.search(r"^from htgrpo_jax import .*\brl\b", b, flags=re.M)]
  assert snippets, "README.md has no ```python block with `from htgrpo_jax import rl`"
  return snippets[0]


def test_readme_library_snippet_runs_with_the_trainer_stack_absent():
  out = _run_blocked(readme_library_snippet())
  assert out.returncode == 0, out.stderr[-4000:]
  assert "'global'" in out.stdout and "'refine'" in out.stdout, out.stdout


@pytest.mark.slow
def test_core_install_in_a_fresh_venv_runs_the_readme_snippet(tmp_path):
  # Install from a copy of the sources: building in the checkout would leave build/ behind there.
  src = tmp_path / "src"
  src.mkdir()
  shutil.copy(os.path.join(REPO, "pyproject.toml"), src)
  shutil.copy(os.path.join(REPO, "README.md"), src)
  shutil.copytree(PACKAGE, src / "htgrpo_jax", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  py = str(venv / "bin" / "python")
  install = subprocess.run(
      [py, "-m", "pip", "install", "--quiet", str(src)], capture_output=True, text=True, timeout=1800
  )
  assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

  probe = "import importlib.util as u; " f"print(sorted(m for m in {TRAINER_STACK!r} if u.find_spec(m) is not None))"
  present = subprocess.run([py, "-c", probe], capture_output=True, text=True, timeout=300)
  assert present.returncode == 0, present.stderr[-3000:]
  assert present.stdout.strip() == "[]", f"the core install brought in: {present.stdout.strip()}"

  snippet = tmp_path / "snippet.py"
  snippet.write_text(readme_library_snippet())
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  run = subprocess.run([py, str(snippet)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-4000:]
  assert "'global'" in run.stdout and "'refine'" in run.stdout, run.stdout


def test_ci_installs_libtpu_so_the_aot_tests_run_there():
  """CI runs README's `# ci:test` line (.ci/run); it installs the [tpu] extra, whose jax[tpu] brings
  libtpu, so the AOT pre-flight tests (which skip without libtpu) run on every landing; and .ci/run
  makes a missing libtpu fail them instead (HTGRPO_REQUIRE_LIBTPU)."""
  readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read().splitlines()
  line = [ln for ln in readme if ln.rstrip().endswith("# ci:test")]
  assert len(line) == 1, line
  extras = re.search(r'pip install -e "\.\[([\w,]+)\]"', line[0])
  assert extras and {"train", "test", "tpu"} <= set(extras.group(1).split(",")), line[0]
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    tpu = tomllib.load(f)["project"]["optional-dependencies"]["tpu"]
  assert any(re.match(r"jax\[tpu\]", d) for d in tpu), tpu
  ci = open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read()
  assert "export HTGRPO_REQUIRE_LIBTPU=1" in ci
  for name in ("test_aot_compile.py", os.path.join("models", "test_aot.py")):
    src = open(os.path.join(REPO, "tests", name), encoding="utf-8").read()
    assert "require_libtpu()" in src and 'importorskip("libtpu")' not in src, name


def test_require_libtpu_fails_instead_of_skipping_where_ci_says_so(monkeypatch):
  import builtins
  from tests.helpers import tpu

  real_import = builtins.__import__
  monkeypatch.setattr(
      builtins,
      "__import__",
      lambda name, *a, **k: (
          (_ for _ in ()).throw(ImportError("no libtpu")) if name == "libtpu" else real_import(name, *a, **k)
      ),
  )
  monkeypatch.delenv("HTGRPO_REQUIRE_LIBTPU", raising=False)
  with pytest.raises(pytest.skip.Exception):
    tpu.require_libtpu()
  monkeypatch.setenv("HTGRPO_REQUIRE_LIBTPU", "1")
  with pytest.raises(ImportError, match="HTGRPO_REQUIRE_LIBTPU=1"):
    tpu.require_libtpu()


_NO_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` raises ImportError; find_spec("torch") is None
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from htgrpo_jax import aot, evaluate_run, export, tasks, trainer  # noqa: F401
from htgrpo_jax.models import convert, layouts, policy, vq  # noqa: F401
from htgrpo_jax.models.vq import magvit2, vqgan  # noqa: F401
w = (np.arange(12, dtype=np.float32).reshape(3, 4) / 7).astype(ml_dtypes.bfloat16)
save_file({"model.transformer.wte.weight": w}, sys.argv[1])
with convert.SafetensorsFile(sys.argv[1]) as f:
  got = f.get_tensor("model.transformer.wte.weight")
assert got.dtype == ml_dtypes.bfloat16 and (got == w).all(), got
print("TORCH", sorted(m for m in sys.modules if m.split(".")[0] == "torch" and sys.modules[m] is not None))
"""


def test_the_8b_path_imports_and_reads_bf16_safetensors_with_torch_absent(tmp_path):
  """The fast check beside tests/models/test_no_torch.py's end-to-end run (-m slow): with torch
  absent (a TPU VM installs [tpu,train], not [torch]) the trainer, the t2i task, the converters and
  the VQ decoders import, and a BF16 safetensors tensor reads to numpy (ml_dtypes) exactly."""
  out = subprocess.run(
      [sys.executable, "-c", _NO_TORCH, str(tmp_path / "w.safetensors")],
      cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  assert "TORCH []" in out.stdout, out.stdout
