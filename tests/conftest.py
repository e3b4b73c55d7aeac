"""Test setup: 8 fake CPU devices for mesh tests, set before JAX initialises."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")

import hypothesis  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import gcs  # noqa: E402

# Numerical property tests compile small programs per example; keep them few and deadline-free.
hypothesis.settings.register_profile("htgrpo", max_examples=20, deadline=None, derandomize=True)
hypothesis.settings.load_profile("htgrpo")


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """``gs://<name>/...`` served from ``tmp_path/gcs/<name>/...`` (``tests/helpers/gcs.py``); the
  test runs in an empty working directory, so a mangled URL (``./gs:/b/run``) fails it."""
  root = tmp_path / "gcs"
  root.mkdir()
  gcs.serve(root, monkeypatch)
  (tmp_path / "cwd").mkdir()
  monkeypatch.chdir(tmp_path / "cwd")
  yield root
  assert os.listdir(tmp_path / "cwd") == []
