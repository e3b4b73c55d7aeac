"""``.safetensors`` files read and written with numpy alone: no torch, BF16 and FP8 through
``ml_dtypes``.

safetensors' own numpy reader (``safe_open(path, framework="np")``, ``safetensors.numpy.load_file``;
0.8.0 checked) raises ``TypeError: data type 'bfloat16' not understood`` on BF16 tensors, which is
how the 8B checkpoints are stored, so the file is parsed here. The format is: an 8-byte
little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` (offsets
relative to the first byte after the header), then the raw little-endian C-order data.
"""

from __future__ import annotations

import json
import math
import os
import sys

import ml_dtypes
import numpy as np

# safetensors dtype name -> numpy dtype (little-endian; the format's byte order).
SAFETENSORS_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


class SafetensorsFile:
  """A ``.safetensors`` file read with numpy alone (no torch, BF16 via ``ml_dtypes``).

  The header is parsed and validated on open (every dtype known, every tensor's byte range inside
  the file and of its shape's size); ``get_tensor`` reads one tensor's bytes into a fresh array.

  Raises:
    ValueError naming the file (truncated, not safetensors, bad header).
  """

  def __init__(self, path: str):
    self.path = str(path)
    self._f = open(self.path, "rb")
    try:
      self._tensors, self.metadata, self._data_start = self._parse()
    except BaseException:
      self._f.close()
      raise

  def _parse(self):
    size = os.fstat(self._f.fileno()).st_size
    head = self._f.read(8)
    if len(head) < 8:
      raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(head, "little")
    if n > min(_MAX_HEADER, size - 8):
      raise ValueError(f"header length {n} exceeds the file ({size} bytes) or {_MAX_HEADER}")
    try:
      header = json.loads(self._f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
      raise ValueError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    available = size - 8 - n
    tensors = {}
    for name, info in header.items():
      try:
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
      except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"tensor {name}: bad header entry {info!r} (dtypes known: " f"{', '.join(SAFETENSORS_DTYPES)})"
        ) from None
      if min(shape, default=0) < 0 or not 0 <= begin <= end:
        raise ValueError(f"tensor {name}: bad shape {shape} or offsets {[begin, end]}")
      if end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"tensor {name}: {end - begin} bytes for shape {shape} of {info['dtype']}")
      if end > available:
        raise ValueError(f"tensor {name} ends at byte {end} of a {available}-byte data section " "(truncated)")
      tensors[name] = (dtype, shape, begin)
    return tensors, metadata, 8 + n

  def keys(self) -> list[str]:
    return list(self._tensors)

  def __contains__(self, key) -> bool:
    return key in self._tensors

  def shape(self, key: str) -> tuple[int, ...]:
    return self._tensors[key][1]

  def dtype(self, key: str) -> np.dtype:
    return self._tensors[key][0]

  def get_tensor(self, key: str) -> np.ndarray:
    """The tensor as a new (writable, native byte order) numpy array."""
    dtype, shape, begin = self._tensors[key]
    out = np.empty(shape, dtype)
    buf = memoryview(out.reshape(-1).view(np.uint8))
    self._f.seek(self._data_start + begin)
    got = 0
    while got < len(buf):
      k = self._f.readinto(buf[got:])
      if not k:
        raise ValueError(
            f"tensor {key}: file {self.path} ended after {got} of {len(buf)} bytes " "(truncated while open?)"
        )
      got += k
    if sys.byteorder == "big" and dtype.itemsize > 1:
      out = out.byteswap()  # the data is little-endian; ml_dtypes types are native-order
    return out

  def close(self) -> None:
    self._f.close()

  def __enter__(self) -> "SafetensorsFile":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def open_safetensors(path: str) -> SafetensorsFile:
  """``SafetensorsFile(path)`` (a context manager); a truncated or foreign file raises ValueError
  naming it."""
  try:
    return SafetensorsFile(path)
  except (ValueError, OSError) as e:  # the file is unusable
    raise ValueError(
        f"safetensors file {path} is unreadable (truncated or not safetensors?): " f"{type(e).__name__}: {e}"
    ) from None


_NP_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """Writes ``tensors`` as one ``.safetensors`` file (the format ``SafetensorsFile`` reads; BF16
  through ``ml_dtypes``), atomically (a temporary file, then renamed)."""
  header, offset = {}, 0
  for name, arr in tensors.items():
    if arr.dtype not in _NP_TO_SAFETENSORS:
      raise ValueError(f"tensor {name}: dtype {arr.dtype} has no safetensors name")
    header[name] = {
        "dtype": _NP_TO_SAFETENSORS[arr.dtype],
        "shape": list(arr.shape),
        "data_offsets": [offset, offset + arr.nbytes],
    }
    offset += arr.nbytes
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for arr in tensors.values():
      a = np.ascontiguousarray(arr)
      if sys.byteorder == "big" and a.dtype.itemsize > 1:
        a = a.byteswap()
      f.write(memoryview(a.reshape(-1).view(np.uint8)))
  os.replace(tmp, path)
