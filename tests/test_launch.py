"""The launch helpers people run by hand: the Colab notebook and the TPU VM script."""
import os
import shlex
import subprocess

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_colab_notebook_runs_top_to_bottom_with_the_tiny_config(tmp_path, monkeypatch):
  nb = nbformat.read(os.path.join(REPO, "launch", "colab.ipynb"), as_version=4)
  monkeypatch.setenv("HTGRPO_RUN_DIR", str(tmp_path))
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs)
  assert any("finished at step 4" in o.get("text", "") for o in outputs)
  assert os.path.exists(tmp_path / "rl" / "results.md")


@pytest.mark.parametrize("cmd,expect", [
    ("create", "gcloud compute tpus tpu-vm create"),
    ("install", "--worker=all"),
    ("train", "launch/train.py --config=configs/mmada_geneval.py"),
    ("delete", "gcloud compute tpus tpu-vm delete"),
])
def test_tpu_vm_script_dry_run_prints_the_gcloud_commands(cmd, expect):
  env = dict(os.environ, DRY_RUN="1", ZONE="us-east5-a", ACCELERATOR="v5p-64")
  script = os.path.join(REPO, "launch", "tpu_vm.sh")
  out = subprocess.run(["bash", script, cmd, "t1"], env=env, capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 0, out.stderr
  printed = " ".join(shlex.split(out.stdout))  # the script prints shell-quoted commands
  assert expect in printed and "t1" in printed
  if cmd == "create":
    assert "--accelerator-type=v5p-64" in printed and "--version=v2-alpha-tpuv5" in printed
  missing = subprocess.run(["bash", script, cmd], env=env, capture_output=True, text=True, timeout=60)
  assert missing.returncode == 2 and "missing NAME" in missing.stderr
