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
  return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing_in_the_repository():
  out = _ruff(".")
  assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def test_ruff_reads_the_projects_rules(tmp_path):
  """The same config flags what it should (so the test above cannot pass on an empty rule set) and
  accepts the house style (2-space indents, lambda closures)."""
  bad = tmp_path / "bad.py"
  bad.write_text("import os\n\n\ndef f(x):\n  l = x + undefined\n  return l\n\n\n" + "y = " + "1 + " * 30 + "1\n")
  out = _ruff("--config", os.path.join(REPO, "pyproject.toml"), "--output-format", "concise", str(bad))
  codes = {line.split(": ")[1].split()[0] for line in out.stdout.splitlines() if ": " in line and
           line.startswith(str(bad))}
  assert codes == {"F401", "E741", "F821", "E501"}, out.stdout
  good = tmp_path / "good.py"
  good.write_text("def f(x):\n  g = lambda y: y + 1\n  return g(x)\n")
  out = _ruff("--config", os.path.join(REPO, "pyproject.toml"), str(good))
  assert out.returncode == 0, out.stdout
