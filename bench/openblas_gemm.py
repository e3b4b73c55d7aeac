"""The projections' matmuls as an XLA FFI call to OpenBLAS: an experiment on the CPU step's GEMM rate.

``bench/train_step.py --dense=flat,openblas`` traces the policy with ``flat_matmul`` below in place of
``htgrpo_jax.models.llada.flat_matmul`` and times it beside the XLA step and eager PyTorch
(docs/performance.md, "An OpenBLAS GEMM inside the step"). The forward is one ``sgemm``; the backward
two more with transposed operands (dx = dy W^T, dW = x^T dy), as PyTorch's ``mm`` backward does. The
library is compiled on first use (``g++`` and the FFI headers jaxlib ships) into
``$XDG_CACHE_HOME/htgrpo_jax`` and calls numpy's bundled OpenBLAS (scipy-openblas, 64-bit ints).
Bench-only: a CPU custom call has no sharding rule, so the package never uses it.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SRC = Path(__file__).with_suffix(".cc")
_TARGET = "htgrpo_openblas_gemm"
_lib: ctypes.CDLL | None = None


@functools.cache
def _openblas() -> ctypes.CDLL:
  """numpy's bundled scipy-openblas (64-bit ints; symbols ``scipy_*64_``); RuntimeError when missing."""
  libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
  found = sorted(glob.glob(str(libs / "libscipy_openblas64_*.so*")))
  if not found:
    raise RuntimeError(f"openblas_gemm: no libscipy_openblas64_*.so under {libs} (numpy without bundled OpenBLAS)")
  return ctypes.CDLL(found[0])


def set_blas_threads(n: int) -> None:
  """Threads of numpy's OpenBLAS (the FFI GEMM's and ``numpy.matmul``'s); needs no build."""
  _openblas().scipy_openblas_set_num_threads64_(int(n))


def _build() -> Path:
  src = _SRC.read_bytes()
  tag = hashlib.sha256(src + jax.__version__.encode()).hexdigest()[:12]
  cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "htgrpo_jax"
  out = cache / f"openblas_gemm_{tag}.so"
  if out.exists():
    return out
  cxx = shutil.which(os.environ.get("CXX", "g++"))
  if cxx is None:
    raise RuntimeError("openblas_gemm: no C++ compiler (set CXX or install g++)")
  cache.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(f".{os.getpid()}.tmp")
  cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", str(_SRC), "-I", jax.ffi.include_dir(), "-o", str(tmp)]
  subprocess.run(cmd, check=True, capture_output=True)
  os.replace(tmp, out)  # atomic: a concurrent build never sees half a library
  return out


def load(threads: int = 1) -> None:
  """Builds (once), loads and registers the FFI target; OpenBLAS gets ``threads`` threads."""
  global _lib
  if _lib is None:
    lib = ctypes.CDLL(str(_build()))
    lib.htgrpo_gemm_init(ctypes.cast(_openblas().scipy_cblas_sgemm64_, ctypes.c_void_p))
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.HtgrpoGemm), platform="cpu")
    _lib = lib
  set_blas_threads(threads)


def _gemm(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  m = a.shape[1] if trans_a else a.shape[0]
  n = b.shape[0] if trans_b else b.shape[1]
  call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32))
  return call(a, b, trans_a=np.int32(trans_a), trans_b=np.int32(trans_b))


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x [R, K] @ w [K, N] -> [R, N]``, fp32, by OpenBLAS."""
  return _gemm(x, w)


def _matmul_fwd(x, w):
  return _gemm(x, w), (x, w)


def _matmul_bwd(res, dy):
  x, w = res
  return _gemm(dy, w, trans_b=True), _gemm(x, dy, trans_a=True)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def flat_matmul(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  """Drop-in for ``llada.flat_matmul`` (fp32 only): ``x [..., *in] @ kernel [*in, *out]``."""
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    raise TypeError(f"openblas_gemm.flat_matmul: fp32 only, got x {x.dtype}, kernel {kernel.dtype}")
  in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
  lead = x.shape[: x.ndim - n_in]
  k_in, k_out = int(np.prod(in_shape)), int(np.prod(out_shape))
  return matmul(x.reshape((-1, k_in)), kernel.reshape((k_in, k_out))).reshape(lead + out_shape)
