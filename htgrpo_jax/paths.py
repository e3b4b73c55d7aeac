"""Paths that may be local or a URL (``gs://bucket/run``): one small set of helpers for both.

Every path a run takes (workdir, checkpoints, prompt files, tokenizer and VQ folders, the
ShapeEval world) may be a URL with a scheme. ``os.path.abspath('gs://b/run')`` would turn it into
``<cwd>/gs:/b/run``, so code resolves paths with ``resolve`` instead, and reads and writes through
these helpers:

* a local path takes the plain ``os`` / ``open`` route, exactly as before (no extra dependency, no
  behaviour change on a local disk);
* a URL goes through ``etils.epath`` (an orbax dependency, so always installed). ``gs://`` needs
  a GCS backend in the environment: ``gcsfs`` (epath's fsspec backend) or TensorFlow's
  ``tf.io.gfile``; epath picks whichever is installed.

Libraries that can only read local files (transformers' tokenizers, safetensors) get a local copy
of a URL through ``local_copy``.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import re
import shutil
import tempfile
from typing import IO, Any

__all__ = [
    "is_url",
    "resolve",
    "join",
    "exists",
    "isdir",
    "isfile",
    "makedirs",
    "listdir",
    "open",
    "rmtree",
    "rename",
    "append_text",
    "write_text_atomic",
    "local_copy",
]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(path: str | os.PathLike) -> bool:
  """True for a path with a scheme (``gs://b/x``, ``s3://b/x``, ``file:///x``)."""
  return bool(_SCHEME.match(os.fspath(path)))


def _epath(path: str | os.PathLike):
  from etils import epath  # imported on first URL use: local runs never pay for it

  return epath.Path(os.fspath(path))


def resolve(path: str | os.PathLike) -> str:
  """An absolute local path (``os.path.abspath``), or the URL unchanged."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def join(path: str | os.PathLike, *parts: str) -> str:
  """``os.path.join`` (it keeps a URL's ``scheme://`` intact, the parts are plain names)."""
  return os.path.join(os.fspath(path), *parts)


def exists(path: str | os.PathLike) -> bool:
  return _epath(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
  return _epath(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path: str | os.PathLike) -> bool:
  return _epath(path).is_file() if is_url(path) else os.path.isfile(path)


def makedirs(path: str | os.PathLike, exist_ok: bool = True) -> None:
  if is_url(path):
    _epath(path).mkdir(parents=True, exist_ok=exist_ok)
  else:
    os.makedirs(path, exist_ok=exist_ok)


def listdir(path: str | os.PathLike) -> list[str]:
  """Entry names (not paths) of a folder."""
  if is_url(path):
    return [p.name for p in _epath(path).iterdir()]
  return os.listdir(path)


def open(path: str | os.PathLike, mode: str = "r", encoding: str | None = None) -> IO[Any]:  # noqa: A001
  """``open`` for a local path; ``epath.Path(path).open`` for a URL (text is UTF-8 there)."""
  if is_url(path):
    return _epath(path).open(mode, encoding=encoding)
  return builtins.open(path, mode, encoding=encoding)


def rmtree(path: str | os.PathLike, ignore_errors: bool = False) -> None:
  if not is_url(path):
    shutil.rmtree(path, ignore_errors=ignore_errors)
    return
  try:
    _epath(path).rmtree()
  except Exception:  # noqa: BLE001 - mirrors shutil.rmtree(ignore_errors=True)
    if not ignore_errors:
      raise


def rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """``os.rename`` locally; on object stores a copy-then-delete (not atomic there)."""
  if is_url(src) or is_url(dst):
    _epath(src).rename(_epath(dst) if is_url(dst) else dst)
  else:
    os.rename(src, dst)


def append_text(path: str | os.PathLike, text: str) -> None:
  """Appends ``text`` (UTF-8). Object stores cannot append: a URL is read and rewritten whole."""
  if not is_url(path):
    with builtins.open(path, "a", encoding="utf-8") as f:
      f.write(text)
    return
  p = _epath(path)
  p.write_text((p.read_text() if p.exists() else "") + text)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` (UTF-8) so that a reader never sees half of it: locally a ``.tmp`` file and
  ``os.replace``; an object-store write is already all-or-nothing."""
  if is_url(path):
    _epath(path).write_text(text)
    return
  tmp = os.fspath(path) + ".tmp"
  with builtins.open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def local_copy(path: str | os.PathLike, cache_dir: str | None = None) -> str:
  """A local path with the contents of ``path``: the path itself when local, else a copy of the
  URL's file or folder under ``cache_dir`` (default: ``<tmp>/htgrpo_jax_cache``), reused when
  present. For readers that need a local file system (tokenizers, safetensors)."""
  path = os.fspath(path)
  if not is_url(path):
    return path
  cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "htgrpo_jax_cache")
  src = _epath(path)
  name = src.name or "root"
  dst = os.path.join(cache_dir, hashlib.sha256(path.encode()).hexdigest()[:16], name)
  if os.path.exists(dst):
    return dst
  tmp = f"{dst}.partial.{os.getpid()}"
  if src.is_dir():
    os.makedirs(tmp, exist_ok=True)
    for root, _, files in src.walk():  # (rglob refuses '**' on object stores)
      rel = os.path.relpath(os.fspath(root), os.fspath(src))
      os.makedirs(os.path.join(tmp, rel), exist_ok=True)
      for name in files:
        with builtins.open(os.path.join(tmp, rel, name), "wb") as w:
          w.write((root / name).read_bytes())
  else:
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    with builtins.open(tmp, "wb") as w:
      w.write(src.read_bytes())
  os.replace(tmp, dst)  # complete copies only: a killed download is redone
  return dst
