"""The Colab notebook: a Colab TPU notebook (metadata, badge, the [tpu,train] install with its
restart notice, a device check) that runs top to bottom on this CPU with the tiny config. The
install cell runs too: htgrpo_jax is importable here, so it takes its skip branch.
(launch/tpu_vm.sh: tests/test_tpu_vm.py.)"""

import os

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "launch", "colab.ipynb")


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def test_colab_notebook_targets_a_tpu_runtime():
  nb = _read()
  nbformat.validate(nb)
  assert nb.metadata["accelerator"] == "TPU"
  assert nb.metadata["colab"]["gpuType"].startswith("V") and nb.metadata["kernelspec"]["name"] == "python3"
  first = nb.cells[0]
  assert (
      first.cell_type == "markdown"
      and ("(https://colab.research.google.com/github/htgrpo/htgrpo_jax/blob/main/launch/colab.ipynb)" in first.source)
      and "colab-badge.svg" in first.source
  )
  code = [c.source for c in nb.cells if c.cell_type == "code"]
  install = code[0]
  assert "'htgrpo_jax_src[tpu,train]'" in install and "RESTART NEEDED" in install
  assert "os.kill(os.getpid(), 9)" in install and "google.colab" in install
  assert any("jax.devices()" in c and "device_kind" in c and "default_backend" in c for c in code)
  assert not any(
      o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
  ), "commit the notebook without outputs"


@pytest.mark.slow
def test_colab_notebook_runs_top_to_bottom_with_the_tiny_config(tmp_path, monkeypatch):
  nb = _read()
  monkeypatch.setenv("HTGRPO_RUN_DIR", str(tmp_path))
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  # allow_errors=False: the first cell that raises stops the run with CellExecutionError.
  NotebookClient(
      nb, timeout=600, kernel_name="python3", allow_errors=False, resources={"metadata": {"path": str(tmp_path)}}
  ).execute()
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code), "a cell did not run"
  outputs = [o for c in code for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs)
  assert "htgrpo_jax is installed: nothing to do." in text
  assert "platform: cpu, devices: 1, kinds: ['cpu']" in text
  assert "No TPU found" in text
  assert any("image/png" in o.get("data", {}) for o in outputs)
  assert "finished at step 4" in text
  assert os.path.exists(tmp_path / "rl" / "results.md")
  assert os.path.isdir(tmp_path / "jax_cache")  # setup_runtime made the compilation cache


def test_a_failing_cell_fails_the_run(tmp_path):
  """The runner above really stops on an error (so the test can fail)."""
  nb = _read()
  nb.cells = [
      nbformat.v4.new_code_cell("print('ok')"),
      nbformat.v4.new_code_cell("1 / 0"),
      nbformat.v4.new_code_cell("print('never')"),
  ]
  with pytest.raises(CellExecutionError, match="ZeroDivisionError"):
    NotebookClient(
        nb, timeout=120, kernel_name="python3", allow_errors=False, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
  assert not nb.cells[2].get("outputs")


# The test's virtualenv sees this machine's packages (jax, libtpu, ..., as Colab's image has its
# own) but not the htgrpo_jax installed here: the first import after startup drops that install's
# editable finder (a module outside the virtualenv), so the notebook finds the package missing.
_HIDE = """
import os, sys
class _HideOtherHtgrpo:
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    for f in list(sys.meta_path):
      owner = getattr(f, "__module__", None) or ""
      file = getattr(sys.modules.get(owner), "__file__", None)
      if "htgrpo_jax" in owner and file and not os.path.abspath(file).startswith(sys.prefix + os.sep):
        sys.meta_path.remove(f)
    return None
sys.meta_path.insert(0, _HideOtherHtgrpo)
"""


@pytest.mark.slow
def test_colab_install_cell_installs_the_tpu_extra_then_asks_for_a_restart(tmp_path):
  """The install cell's install branch, for real, in a virtualenv where htgrpo_jax is missing:
  it clones the repository (here from this checkout's git history: HTGRPO_GIT), installs the clone
  with the [tpu,train] extras, prints the restart notice and ends the cell; run again, it finds
  the package and skips itself."""
  import subprocess
  import sys

  install = _read().cells[1].source
  assert "pip', 'install'" in install
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
  py = str(venv / "bin" / "python")
  site = subprocess.run(
      [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      capture_output=True,
      text=True,
      check=True,
  ).stdout.strip()
  (tmp_path / "hide").mkdir()
  (tmp_path / "hide" / "_hide_htgrpo.py").write_text(_HIDE)
  with open(os.path.join(site, "000_hide_htgrpo.pth"), "w") as f:
    f.write(f"{tmp_path / 'hide'}\nimport _hide_htgrpo\n")
  work = tmp_path / "content"  # Colab's working directory
  work.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(HTGRPO_GIT=REPO, JAX_PLATFORMS="cpu")
  probe = "import importlib.util as u; s = u.find_spec('htgrpo_jax'); print('FOUND', s and s.origin)"
  before = subprocess.run([py, "-c", probe], cwd=work, env=env, capture_output=True, text=True)
  assert before.stdout.strip() == "FOUND None", before.stdout + before.stderr[-2000:]

  first = subprocess.run([py, "-c", install], cwd=work, env=env, capture_output=True, text=True, timeout=1800)
  assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]  # the cell's SystemExit
  assert "RESTART NEEDED" in first.stdout and "Restart the kernel" in first.stderr, first.stderr[-3000:]
  assert (work / "htgrpo_jax_src" / "launch" / "colab.ipynb").is_file()  # the clone
  after = subprocess.run(
      [py, "-c", probe + "; import htgrpo_jax.trainer, libtpu, gcsfs"],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert after.returncode == 0, after.stderr[-3000:]
  assert after.stdout.strip().startswith(f"FOUND {work / 'htgrpo_jax_src' / 'htgrpo_jax'}"), after.stdout
  # After the restart, in Colab's working directory (where the clone is): the install cell skips
  # itself, and the next cells (devices, config + runtime setup) run on the installed package.
  cells = [c.source for c in _read().cells if c.cell_type == "code"]
  again = subprocess.run(
      [py, "-c", "\n".join(cells[:3])],
      cwd=work,
      timeout=600,
      capture_output=True,
      text=True,
      env=dict(env, HTGRPO_RUN_DIR=str(tmp_path / "run")),
  )
  assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
  assert "htgrpo_jax is installed: nothing to do." in again.stdout and "platform: cpu" in again.stdout
  assert (tmp_path / "run" / "jax_cache").is_dir()  # the setup cell ran
