"""Minimal safetensors reading (one tensor at a time, memory-mapped) and writing.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then the
raw little-endian tensor bytes. Reading never loads a whole file: each tensor is a view into a memory map.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
  """A malformed or inconsistent safetensors file; the message names the file and tensor."""


class SafetensorsFile:
  """Lazy reader: `names()`, `info(name)` -> (dtype, shape), `get(name)` -> read-only memory-mapped array."""

  def __init__(self, path: str):
    self.path = path
    try:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
          raise SafetensorsError(f"{path}: header length {n} exceeds the file size {size} (truncated file?)")
        header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise SafetensorsError(f"{path}: cannot read the safetensors header ({e})") from e
    header.pop("__metadata__", None)
    self._base, self._header, self._size = 8 + n, header, size
    for name, entry in header.items():
      dtype, shape = self.info(name)
      begin, end = entry["data_offsets"]
      if end - begin != math.prod(shape) * dtype.itemsize:
        raise SafetensorsError(f"{path}: tensor {name!r} has {end - begin} bytes but {entry['dtype']}{shape} "
                               f"needs {math.prod(shape) * dtype.itemsize}")
      if self._base + end > size:
        raise SafetensorsError(f"{path}: tensor {name!r} ends at byte {self._base + end} beyond the file size "
                               f"{size} (truncated file?)")
    self._mmap = None

  def names(self) -> list[str]:
    return list(self._header)

  def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
    entry = self._entry(name)
    if entry["dtype"] not in DTYPES:
      raise SafetensorsError(f"{self.path}: tensor {name!r} has unknown dtype {entry['dtype']!r}")
    return DTYPES[entry["dtype"]], tuple(entry["shape"])

  def get(self, name: str) -> np.ndarray:
    dtype, shape = self.info(name)
    begin, end = self._entry(name)["data_offsets"]
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    return self._mmap[self._base + begin:self._base + end].view(dtype).reshape(shape)

  def _entry(self, name: str) -> dict:
    if name not in self._header:
      raise SafetensorsError(f"{self.path}: no tensor named {name!r}")
    return self._header[name]


def write(path: str, tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
          metadata: Mapping[str, str] | None = None) -> int:
  """Write tensors (in the given order) to `path`; returns the number of data bytes."""
  items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
  header, offset = {}, 0
  for name, arr in items:
    if arr.dtype not in _NAMES:
      raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {arr.dtype}")
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, arr in items:
      f.write(np.ascontiguousarray(arr).tobytes())
  return offset
