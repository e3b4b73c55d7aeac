"""The linter runs in CI: ``ruff check`` over the repository with pyproject.toml's rules (pycodestyle
errors and warnings + pyflakes, 120 columns, 2-space indents) finds nothing. ruff is in the ``test``
extra that README's ``# ci:test`` line installs."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("ruff")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff(*args: str, cwd: str = REPO) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "ruff", "check", "--no-cache", *args], cwd=cwd, capture_output=True, text=True, timeout=300
  )


def test_ruff_finds_nothing_in_the_repository():
  out = _ruff(".")
  assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def test_ruff_reads_the_projects_rules(tmp_path):
  """The same config flags what it should (so the test above cannot pass on an empty rule set) and
  accepts the house style (2-space indents, lambda closures)."""
  bad = tmp_path / "bad.py"
  bad.write_text("import os\n\n\ndef f(x):\n  l = x + undefined\n  return l\n\n\n" + "y = " + "1 + " * 30 + "1\n")
  out = _ruff("--config", os.path.join(REPO, "pyproject.toml"), "--output-format", "concise", str(bad))
  codes = {
      line.split(": ")[1].split()[0] for line in out.stdout.splitlines() if ": " in line and line.startswith(str(bad))
  }
  assert codes == {"F401", "E741", "F821", "E501"}, out.stdout
  good = tmp_path / "good.py"
  good.write_text("def f(x):\n  g = lambda y: y + 1\n  return g(x)\n")
  out = _ruff("--config", os.path.join(REPO, "pyproject.toml"), str(good))
  assert out.returncode == 0, out.stdout


def _imports_and_path_inserts(path: str) -> tuple[list[str], list[str]]:
  """(modules a file imports, the sources of the folders it puts on ``sys.path``)."""
  import ast

  names, inserts = [], []
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.append(node.module)
    elif isinstance(node, ast.Call) and ast.unparse(node.func) == "sys.path.insert" and len(node.args) == 2:
      inserts.append(ast.unparse(node.args[1]))
  return names, inserts


def test_no_test_imports_another_test_file():
  """Shared test code lives in tests/helpers/ (imported as ``tests.helpers.x``): no test module
  imports another test module, and none puts a folder other than bench/ or launch/ (the scripts
  under test) on ``sys.path``."""
  import glob

  bad = []
  for path in sorted(glob.glob(os.path.join(REPO, "tests", "**", "*.py"), recursive=True)):
    rel = os.path.relpath(path, REPO)
    names, inserts = _imports_and_path_inserts(path)
    bad += [
        f"{rel} imports {n}" for n in names if n.split(".")[-1].startswith("test_") or n.split(".")[-1] == "conftest"
    ]
    bad += [f"{rel} puts {src} on sys.path" for src in inserts if "bench" not in src and "launch" not in src]
  assert not bad, "\n".join(bad)


def test_dependency_page_is_current():
  """docs/deps.md is what ``python docs/make_deps.py`` writes from today's imports (rerun it after
  moving code)."""
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "docs", "make_deps.py"), "--check"],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:] + "\nrun: python docs/make_deps.py"


def _pyink(*args: str) -> subprocess.CompletedProcess:
  pytest.importorskip("pyink")
  return subprocess.run([sys.executable, "-m", "pyink", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_repository_is_formatted_by_pyink():
  """The formatter (pyproject's ``[tool.pyink]``: 2-space indents, 120 columns, majority quotes) would
  change nothing: run ``pyink .`` before committing."""
  out = _pyink("--check", ".")
  assert out.returncode == 0, out.stderr[-4000:]


def test_pyink_reads_the_projects_style():
  """The same config turns a 4-space, 130-column function into the house style (so the check above
  cannot pass on another style)."""
  body = "{'key': a, 'other': b, 'third': a + b, 'fourth': a * b, 'fifth': a - b, 'sixth': a / b, 'seventh': a}"
  src = "def f(a, b):\n    return " + body + "\n"
  out = _pyink("--config", os.path.join(REPO, "pyproject.toml"), "--code", src)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[1].startswith("  return {") and not lines[1].startswith("   "), out.stdout
  assert all(len(ln) <= 120 for ln in lines) and "'key'" in out.stdout, out.stdout
