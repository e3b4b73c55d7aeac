"""A local folder standing in for a bucket: ``gs://<name>/...`` is served from ``<root>/<name>/...``
through ``etils.epath``, so the URL code path of ``htgrpo_jax.paths`` runs for real, offline."""

import os

from etils import epath

from htgrpo_jax import paths

SEEN: list[str] = []  # URLs that reached epath in the current test


def serve(root, monkeypatch):
  """Routes every URL ``paths`` hands to epath into ``root``; only ``gs://`` URLs may get there."""
  SEEN.clear()

  def fake(path):
    path = os.fspath(path)
    assert path.startswith("gs://"), path
    SEEN.append(path)
    return epath.Path(root / path[len("gs://") :])

  monkeypatch.setattr(paths, "_epath", fake)
  return root
