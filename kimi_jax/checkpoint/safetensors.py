"""Minimal safetensors reading (one tensor, or a block of its rows, at a time) and streaming writing.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then the
raw little-endian, row-major tensor bytes. Reads use `pread` into fresh buffers rather than a memory map: pages
of a mapped file count toward the process's resident set for as long as the map lives, so converting a 1 TB
checkpoint through maps looks (and, under memory pressure, behaves) like loading it. Rows [r0, r1) of a tensor
are one contiguous byte range, which is what lets converters stream tensors larger than host memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
import errno
import json
import math
import os
import struct
import threading

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
  """A malformed or inconsistent safetensors file; the message names the file and tensor."""


class SafetensorsFile:
  """Lazy reader: `names()`, `info(name)` -> (dtype, shape), `get(name, rows=(r0, r1))` -> a fresh array.

  `path` is a local file (positional reads on one descriptor) or an object URL such as gs://... (ranged reads).
  Thread-safe.
  """

  def __init__(self, path: str):
    self.path = path
    self._bytes = _RemoteBytes(path) if "://" in path else _LocalBytes(path)
    try:
      size = self._bytes.size()
      (n,) = struct.unpack("<Q", self._bytes.read(0, 8))
      if n > size - 8:
        raise SafetensorsError(f"{path}: header length {n} exceeds the file size {size} (truncated file?)")
      header = json.loads(self._bytes.read(8, n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise SafetensorsError(f"{path}: cannot read the safetensors header ({e})") from e
    header.pop("__metadata__", None)
    self._base, self._header = 8 + n, header
    for name, entry in header.items():
      dtype, shape = self.info(name)
      begin, end = entry["data_offsets"]
      if end - begin != math.prod(shape) * dtype.itemsize:
        raise SafetensorsError(
          f"{path}: tensor {name!r} has {end - begin} bytes but {entry['dtype']}{shape} "
          f"needs {math.prod(shape) * dtype.itemsize}"
        )
      if self._base + end > size:
        raise SafetensorsError(
          f"{path}: tensor {name!r} ends at byte {self._base + end} beyond the file size {size} (truncated file?)"
        )

  def names(self) -> list[str]:
    return list(self._header)

  def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
    entry = self._entry(name)
    if entry["dtype"] not in DTYPES:
      raise SafetensorsError(
        f"{self.path}: tensor {name!r} has unknown dtype {entry['dtype']!r} (known: {', '.join(DTYPES)})"
      )
    return DTYPES[entry["dtype"]], tuple(entry["shape"])

  def get(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
    """The tensor, or rows [r0, r1) of its first axis, read into a new array."""
    dtype, shape = self.info(name)
    begin, _ = self._entry(name)["data_offsets"]
    r0, r1 = rows if rows is not None else (0, shape[0] if shape else 1)
    if shape and not 0 <= r0 <= r1 <= shape[0]:
      raise SafetensorsError(f"{self.path}: rows [{r0}, {r1}) outside tensor {name!r} of shape {shape}")
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    out_shape = (r1 - r0,) + shape[1:] if shape else ()
    offset, n = self._base + begin + r0 * row_bytes, math.prod(out_shape) * dtype.itemsize
    if n >= DIRECT_MIN_BYTES:
      raw = self._bytes.read_direct(offset, n)
      if raw is not None:
        if raw.ctypes.data % dtype.itemsize:  # (the tensor starts off its dtype's alignment in the file)
          return raw.copy().view(dtype).reshape(out_shape)
        return raw.view(dtype).reshape(out_shape)
    out = np.empty(out_shape, dtype)
    self._bytes.read_into(out.reshape(-1).view(np.uint8), offset)
    return out

  def close(self) -> None:
    self._bytes.close()

  def _entry(self, name: str) -> dict:
    if name not in self._header:
      raise SafetensorsError(f"{self.path}: no tensor named {name!r}")
    return self._header[name]


DIRECT_MIN_BYTES = 1 << 20  # reads at least this large bypass the page cache where the file system allows
_DIRECT_ALIGN = 4096  # O_DIRECT: file offset, length and buffer address multiples of the logical block size


class _LocalBytes:
  """Positional reads (`os.preadv`) on one descriptor, opened on first use: thread-safe, no shared offset.

  Large reads use a second descriptor opened with O_DIRECT (`read_direct`): the disk writes straight into our
  buffer. A release is read once, so the page cache would only cost a kernel copy per byte and evict the pages
  a conversion's output is being written through (on this project's 2-core VM the copy alone was ~11 % of a
  conversion's CPU). File systems without O_DIRECT (tmpfs, some network mounts) fall back to plain reads.
  """

  def __init__(self, path: str):
    self.path = path
    self._fd: int | None = None
    self._direct_fd: int | None = None
    self._direct_ok = hasattr(os, "O_DIRECT")
    self._lock = threading.Lock()

  def size(self) -> int:
    return os.path.getsize(self.path)

  def read(self, offset: int, n: int) -> bytes:
    buf = np.empty(n, np.uint8)
    self.read_into(buf, offset)
    return buf.tobytes()

  def read_into(self, buf: np.ndarray, offset: int) -> None:
    if self._fd is None:
      with self._lock:
        if self._fd is None:
          self._fd = os.open(self.path, os.O_RDONLY)
    view, done = memoryview(buf), 0
    while done < len(view):  # one call reads at most ~2 GiB
      n = os.preadv(self._fd, [view[done:]], offset + done)
      if n == 0:
        raise SafetensorsError(f"{self.path}: unexpected end of file at byte {offset + done}")
      done += n

  def read_direct(self, offset: int, n: int) -> np.ndarray | None:
    """Bytes [offset, offset + n) as a uint8 view into a block-aligned buffer read with O_DIRECT; None where
    the file system refuses direct reads (the caller then reads through the page cache)."""
    fd = self._open_direct()
    if fd is None:
      return None
    start = offset - offset % _DIRECT_ALIGN
    stop = -(-(offset + n) // _DIRECT_ALIGN) * _DIRECT_ALIGN
    raw = np.empty(stop - start + _DIRECT_ALIGN, np.uint8)
    buf = raw[-raw.ctypes.data % _DIRECT_ALIGN :][: stop - start]
    view, done, need = memoryview(buf), 0, offset + n - start
    try:
      while done < need:  # the last block may run past the end of the file: a short read there is expected
        got = os.preadv(fd, [view[done:]], start + done)
        if got == 0:
          raise SafetensorsError(f"{self.path}: unexpected end of file at byte {start + done}")
        done += got
    except OSError as e:
      if e.errno != errno.EINVAL:
        raise
      self._direct_ok = False  # alignment or file system refused: plain reads from now on
      return None
    return buf[offset - start : offset - start + n]

  def _open_direct(self) -> int | None:
    if self._direct_fd is None and self._direct_ok:
      with self._lock:
        if self._direct_fd is None and self._direct_ok:
          try:
            self._direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
          except OSError as e:
            if e.errno != errno.EINVAL:
              raise
            self._direct_ok = False
    return self._direct_fd if self._direct_ok else None

  def close(self) -> None:
    for name in ("_fd", "_direct_fd"):
      if getattr(self, name) is not None:
        os.close(getattr(self, name))
        setattr(self, name, None)

  def __del__(self, _close=os.close):  # bound at definition: os may be gone at interpreter exit
    for fd in (self._fd, self._direct_fd):
      if fd is not None:
        _close(fd)


class _RemoteBytes:
  """Byte-range reads of an object (gs://...) through fsspec: each read is one ranged GET, so a tensor's rows
  are fetched without downloading the shard. fsspec filesystems are safe to call from several threads."""

  _BLOCK = 256 << 20  # one request at most: a long GET that fails is retried whole

  def __init__(self, path: str):
    import fsspec

    self.path = path
    self._fs, self._key = fsspec.core.url_to_fs(path)

  def size(self) -> int:
    try:
      return int(self._fs.size(self._key))
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{self.path} does not exist") from e

  def read(self, offset: int, n: int) -> bytes:
    return self._fs.cat_file(self._key, start=offset, end=offset + n)

  def read_direct(self, offset: int, n: int) -> None:
    """Objects have no page cache to bypass: the caller reads into its own buffer (`read_into`)."""
    return None

  def read_into(self, buf: np.ndarray, offset: int) -> None:
    for start in range(0, len(buf), self._BLOCK):
      n = min(self._BLOCK, len(buf) - start)
      data = self.read(offset + start, n)
      if len(data) != n:
        raise SafetensorsError(f"{self.path}: unexpected end of object at byte {offset + start + len(data)}")
      buf[start : start + n] = np.frombuffer(data, np.uint8)

  def close(self) -> None:
    pass


class TensorSpec:
  """One tensor of a file being written: its name, dtype, shape and a producer of its bytes in row order."""

  def __init__(self, name: str, dtype: np.dtype, shape: Sequence[int], blocks: Callable[[], Iterable[np.ndarray]]):
    self.name, self.dtype, self.shape, self.blocks = name, np.dtype(dtype), tuple(shape), blocks
    if self.dtype not in _NAMES:
      raise SafetensorsError(f"tensor {name!r} has unsupported dtype {self.dtype}")

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def write_streaming(path: str, specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> int:
  """Write tensors in order, each from its producer's row blocks, holding one block at a time.

  The header needs only names, dtypes and shapes, so it is written first. The file appears at `path` only when
  complete (written to `path + ".tmp"`, then renamed), so a killed writer leaves no half file behind.
  Returns the number of data bytes.
  """
  header, offset = {}, 0
  for spec in specs:
    header[spec.name] = {
      "dtype": _NAMES[spec.dtype],
      "shape": list(spec.shape),
      "data_offsets": [offset, offset + spec.nbytes],
    }
    offset += spec.nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for spec in specs:
      written = 0
      for block in spec.blocks():
        if block.dtype != spec.dtype:
          raise SafetensorsError(f"{path}: tensor {spec.name!r} produced {block.dtype}, declared {spec.dtype}")
        f.write(np.ascontiguousarray(block).reshape(-1).view(np.uint8).data)
        written += block.nbytes
      if written != spec.nbytes:
        raise SafetensorsError(f"{path}: tensor {spec.name!r} produced {written} bytes, declared {spec.nbytes}")
  os.replace(tmp, path)
  return offset


def write(
  path: str,
  tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
  metadata: Mapping[str, str] | None = None,
) -> int:
  """Write in-memory tensors (in the given order) to `path`; returns the number of data bytes."""
  items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
  return write_streaming(path, [TensorSpec(n, a.dtype, a.shape, _single(a)) for n, a in items], metadata)


def _single(array: np.ndarray) -> Callable[[], Iterator[np.ndarray]]:
  return lambda: iter((array,))
