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
  assert first.cell_type == "markdown" and (
      "(https://colab.research.google.com/github/htgrpo/htgrpo_jax/blob/main/launch/colab.ipynb)"
      in first.source) and "colab-badge.svg" in first.source
  code = [c.source for c in nb.cells if c.cell_type == "code"]
  install = code[0]
  assert "'htgrpo_jax[tpu,train]'" in install and "RESTART NEEDED" in install
  assert "os.kill(os.getpid(), 9)" in install and "google.colab" in install
  assert any("jax.devices()" in c and "device_kind" in c and "default_backend" in c for c in code)
  assert not any(o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])), \
      "commit the notebook without outputs"


@pytest.mark.slow
def test_colab_notebook_runs_top_to_bottom_with_the_tiny_config(tmp_path, monkeypatch):
  nb = _read()
  monkeypatch.setenv("HTGRPO_RUN_DIR", str(tmp_path))
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  # allow_errors=False: the first cell that raises stops the run with CellExecutionError.
  NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=False,
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
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
  nb.cells = [nbformat.v4.new_code_cell("print('ok')"), nbformat.v4.new_code_cell("1 / 0"),
              nbformat.v4.new_code_cell("print('never')")]
  with pytest.raises(CellExecutionError, match="ZeroDivisionError"):
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=False,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
  assert not nb.cells[2].get("outputs")
