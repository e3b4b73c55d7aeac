"""libtpu for the AOT tests: they compile for TPU topology descriptions on this CPU and skip where
libtpu is not installed, except where ``HTGRPO_REQUIRE_LIBTPU=1`` (CI, .ci/run) makes that a failure."""

import os

import pytest


def require_libtpu():
  """Imports libtpu; skips the calling module without it (fails under HTGRPO_REQUIRE_LIBTPU=1)."""
  try:
    import libtpu
  except ImportError as e:
    if os.environ.get("HTGRPO_REQUIRE_LIBTPU") == "1":
      raise ImportError(f"libtpu is missing but HTGRPO_REQUIRE_LIBTPU=1 (CI installs the [tpu] extra): {e}") from e
    pytest.skip(
        "libtpu is not installed (pip install -e '.[tpu]'): no TPU topology to compile for", allow_module_level=True
    )
  return libtpu
