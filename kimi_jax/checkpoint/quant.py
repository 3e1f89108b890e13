"""The quantised weight formats of the Kimi K2 releases: dequantisation (reading) and FP8 quantisation (writing).

R rows (out features), C columns (in features) of a linear weight as stored, [R, C].

FP8 (Kimi-K2-Instruct / -Base; config `quant_method: fp8`, `fmt: e4m3`, `weight_block_size: [128, 128]`):
  weight float8_e4m3fn [R, C] and `<weight>_scale_inv` float32 [ceil(R/128), ceil(C/128)];
  W[i, j] = Wq[i, j] · S[i // 128, j // 128] — a multiplier despite the name; edge blocks are partial.
INT4 (Kimi-K2-Thinking; compressed-tensors `pack-quantized`, symmetric, group G = 32, routed experts only):
  `weight_packed` int32 [R, C/8], `weight_scale` bf16 [R, C/G], `weight_shape` int32 [2] = (R, C).
  Value 8g + i of a row sits in packed column g at bits [4i, 4i + 4) as the nibble q + 8 (offset binary);
  W[r, c] = (nibble − 8) · scale[r, c // G].

Tensors are processed in row blocks: `fp8_dequantize` takes the block's first row `row0` (its scale rows depend
on it); INT4 groups run along columns, so an INT4 row block is self-contained. `transpose=True` returns [C, r],
the [in, out] orientation of our kernels.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import threading
from typing import Any

import ml_dtypes
import numpy as np

from kimi_jax.checkpoint.host_ops import transpose_cast

FP8_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
FP8_SCALE_SUFFIX = "_scale_inv"
INT4_SUFFIXES = ("_packed", "_scale", "_shape")  # appended to "...proj.weight"
_INT4_PER_WORD = 8


@dataclasses.dataclass(frozen=True)
class Fp8Scheme:
  block: tuple[int, int] = (128, 128)

  def scale_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / self.block[0]), math.ceil(shape[1] / self.block[1])

  def hf_config(self) -> dict[str, Any]:
    """The `quantization_config` of config.json, as in Kimi-K2-Instruct."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(self.block)}


@dataclasses.dataclass(frozen=True)
class Int4Scheme:
  group: int = 32


def scheme_from_hf(hf_config: dict[str, Any], where: str) -> Fp8Scheme | Int4Scheme | None:
  """The quantisation scheme a config.json declares (None: unquantised); `where` names the file in errors."""
  q = hf_config.get("quantization_config")
  if not q:
    return None
  method = q.get("quant_method")
  if method == "fp8":
    if q.get("fmt", "e4m3") != "e4m3":
      raise ValueError(f"{where}: quantization_config fmt {q['fmt']!r} is not supported (expected e4m3)")
    block = tuple(q.get("weight_block_size") or (128, 128))
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
      raise ValueError(f"{where}: quantization_config weight_block_size {block!r} must be two positive ints")
    return Fp8Scheme((block[0], block[1]))
  if method == "compressed-tensors":
    if q.get("format") != "pack-quantized":
      raise ValueError(
        f"{where}: compressed-tensors format {q.get('format')!r} is not supported (expected pack-quantized)"
      )
    weights = [g.get("weights") or {} for g in q.get("config_groups", {}).values()]
    for w in weights:
      if (w.get("num_bits"), w.get("type"), w.get("symmetric"), w.get("strategy")) != (4, "int", True, "group"):
        raise ValueError(
          f"{where}: compressed-tensors weights {w!r} are not supported (expected num_bits 4, "
          "type int, symmetric, strategy group)"
        )
    groups = sorted({w.get("group_size") for w in weights}, key=str)
    if len(groups) != 1 or not isinstance(groups[0], int) or groups[0] % _INT4_PER_WORD:
      raise ValueError(f"{where}: compressed-tensors needs one group_size, a multiple of 8; got {groups}")
    return Int4Scheme(groups[0])
  raise ValueError(
    f"{where}: quantization_config quant_method {method!r} is not supported (expected fp8 or compressed-tensors)"
  )


def fp8_dequantize(
  wq: np.ndarray,
  scale: np.ndarray,
  block: tuple[int, int],
  row0: int = 0,
  *,
  transpose: bool = False,
  dtype: np.dtype | None = None,
) -> np.ndarray:
  """wq: [r, C] float8_e4m3fn, rows row0.. of the weight; scale: [ceil(R/br), ceil(C/bc)] f32
  -> [r, C] in `dtype` (default float32), or [C, r] with `transpose` (C-contiguous either way).

  Bit for bit `(wq.astype(f32) * scale.astype(f32)[block]).astype(dtype)`: the value is decoded exactly, scaled
  by one float32 multiply and rounded once to `dtype` — done by XLA on the host CPU in one fused pass (see
  `_host_jit`), or by numpy where no CPU backend is available.
  """
  dtype = np.dtype(np.float32 if dtype is None else dtype)
  br, bc = block
  r, c = wq.shape
  rows = (row0 + np.arange(r)) // br  # the scale row of each weight row
  s_rows = np.ascontiguousarray(scale.astype(np.float32, copy=False)[rows])  # [r, ceil(C/bc)]: small
  if _host_device() is None or not _normal_products(s_rows, _FP8_MIN_CODE):
    return _fp8_dequantize_numpy(wq, s_rows, bc, transpose, dtype)
  programs = fp8_programs(r, c, block, transpose=transpose, dtype=dtype)
  q = wq.view(np.uint8)
  if transpose:  # bytes first (XLA transposes fastest alone), then one pass of [C, r] with the scale along rows
    return _run(programs[1], _run(programs[0], q, host=False), np.ascontiguousarray(s_rows.T))
  return _run(programs[0], q, s_rows)


def _fp8_dequantize_numpy(wq, s_rows, bc, transpose, dtype) -> np.ndarray:
  out = transpose_cast(wq, np.float32, transpose)
  col_scale = np.repeat(s_rows, bc, axis=1)[:, : wq.shape[1]]  # [r, C]
  out *= col_scale.T if transpose else col_scale
  return out.astype(dtype, copy=False)


def fp8_quantize(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """w: [R, C] float -> (wq [R, C] float8_e4m3fn, scale_inv [ceil(R/br), ceil(C/bc)] f32), w ≈ wq · scale.

  Each block's scale maps its largest magnitude to 448 (the e4m3 maximum); all-zero blocks get scale 1.
  """
  br, bc = block
  r, c = w.shape
  nr, nc = math.ceil(r / br), math.ceil(c / bc)
  padded = np.zeros((nr * br, nc * bc), np.float32)
  padded[:r, :c] = w
  amax = np.abs(padded.reshape(nr, br, nc, bc)).max(axis=(1, 3))
  scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
  q = padded.reshape(nr, br, nc, bc) / scale[:, None, :, None]
  # The cast does not saturate (past 464 it gives NaN); amax / (amax / 448) may round to just above 448.
  wq = np.clip(q.reshape(nr * br, nc * bc)[:r, :c], -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
  return wq, scale


def int4_unpack(packed: np.ndarray, columns: int, *, transpose: bool = False) -> np.ndarray:
  """packed: [R, ceil(C/8)] int32 -> q: [R, C] int8 in [-8, 7], or [C, R] with `transpose`."""
  words = packed.view(np.uint32)
  nibbles = (words[:, :, None] >> np.arange(0, 32, 4, dtype=np.uint32)) & 0xF  # [R, C/8, 8]: 8g + i at [:, g, i]
  q = nibbles.astype(np.int8).reshape(packed.shape[0], -1)[:, :columns] - np.int8(8)
  return transpose_cast(q, np.int8, transpose)


def int4_pack(q: np.ndarray) -> np.ndarray:
  """q: [R, C] ints in [-8, 7], C a multiple of 8 -> [R, C/8] int32 (the inverse of `int4_unpack`)."""
  r, c = q.shape
  nibbles = (q.astype(np.int64) + 8).astype(np.uint32).reshape(r, c // _INT4_PER_WORD, _INT4_PER_WORD)
  words = np.bitwise_or.reduce(nibbles << np.arange(0, 32, 4, dtype=np.uint32), axis=2)
  return words.astype(np.uint32).view(np.int32)


def int4_dequantize(
  packed: np.ndarray,
  scale: np.ndarray,
  columns: int,
  group: int,
  *,
  transpose: bool = False,
  dtype: np.dtype | None = None,
) -> np.ndarray:
  """packed: [R, C/8] int32; scale: [R, C/G] -> W: [R, C] in `dtype` (default float32), or [C, R] with
  `transpose`; bit for bit `((nibble - 8).astype(f32) * scale.astype(f32)).astype(dtype)`, in one XLA pass."""
  dtype = np.dtype(np.float32 if dtype is None else dtype)
  scale = scale.astype(np.float32, copy=False)
  if _host_device() is None or columns != packed.shape[1] * _INT4_PER_WORD or not _normal_products(scale, 1.0):
    q = int4_unpack(packed, columns, transpose=transpose).astype(np.float32)
    if transpose:
      out = (q.reshape(-1, group, q.shape[1]) * scale.T[:, None, :]).reshape(q.shape)
    else:
      out = (q.reshape(q.shape[0], -1, group) * scale[:, :, None]).reshape(q.shape)
    return out.astype(dtype, copy=False)
  programs = int4_programs(packed.shape[0], columns, group, transpose=transpose, dtype=dtype)
  words = packed.view(np.uint32)
  if transpose:  # words first: [C/8, R], then nibbles unfold along rows, the scale [C/G, R] along rows too
    return _run(programs[1], _run(programs[0], words, host=False), np.ascontiguousarray(scale.T))
  return _run(programs[0], words, scale)


# XLA on the host CPU ---------------------------------------------------------------------------------------------
# Measured per core (benchmarks/convert.py, "decode" rows): XLA's fused float8 → float32 convert, scale multiply and
# cast runs at ~1.3-1.8 GB/s of FP8 input, where numpy's 256-entry table plus multiply runs at ~0.3 and astype at
# ~0.13. XLA's transposes are fastest on the narrow input alone (1-byte codes, 4-byte INT4 words): transposing
# inside the fused decode halves its speed. The computations run on the CPU device even where the default backend
# is an accelerator.
#
# Each program (a decode or transpose for one piece shape, dtype and block) is compiled once per process, ahead of
# time (`jax.jit(...).lower(...).compile()`), by the first thread that asks; others asking meanwhile wait for it.
# A compile takes ~0.1-0.2 s of one core (tracing and lowering hold the GIL for a third of it) and a K2 release has
# a dozen piece shapes, two programs each: seconds that matter next to a small model's conversion. `precompile`
# lets a converter compile them all from the shard headers, on a thread of its own, while it starts up; and a
# persistent compilation cache (jax_compilation_cache_dir, which the convert CLI sets) turns a later run's
# compiles into a lookup (~10-20 ms each).

Program = tuple[str, tuple[tuple[tuple[int, ...], np.dtype], ...], tuple[tuple[str, Any], ...]]
"""(name, ((shape, dtype) of each argument, ...), sorted static arguments): one compiled host program."""


def fp8_programs(
  rows: int, columns: int, block: tuple[int, int], *, transpose: bool, dtype: np.dtype | None = None
) -> list[Program]:
  """The programs `fp8_dequantize` runs on a [rows, columns] block of codes, in order."""
  u8, f32, n = np.dtype(np.uint8), np.dtype(np.float32), math.ceil(columns / block[1])
  dtype = np.dtype(np.float32 if dtype is None else dtype)
  if transpose:
    decode = (((columns, rows), u8), ((n, rows), f32))
    return [("transpose", (((rows, columns), u8),), ()), ("fp8", decode, _static(bc=block[1], axis=0, dtype=dtype))]
  return [("fp8", (((rows, columns), u8), ((rows, n), f32)), _static(bc=block[1], axis=1, dtype=dtype))]


def int4_programs(
  rows: int, columns: int, group: int, *, transpose: bool, dtype: np.dtype | None = None
) -> list[Program]:
  """The programs `int4_dequantize` runs on [rows, columns] values (packed [rows, columns/8]), in order."""
  u32, f32, words = np.dtype(np.uint32), np.dtype(np.float32), columns // _INT4_PER_WORD
  dtype = np.dtype(np.float32 if dtype is None else dtype)
  if transpose:
    decode = (((words, rows), u32), ((columns // group, rows), f32))
    return [("transpose", (((rows, words), u32),), ()), ("int4", decode, _static(group=group, axis=0, dtype=dtype))]
  return [("int4", (((rows, words), u32), ((rows, columns // group), f32)), _static(group=group, axis=1, dtype=dtype))]


def precompile(programs: list[Program]) -> int:
  """Compile those of `programs` no thread has compiled or started to (others are skipped, not waited for).
  Returns how many it compiled; 0 where no CPU backend is available (the numpy paths need none)."""
  if _host_device() is None:
    return 0
  return sum(_program(p, wait=False) is not None for p in programs)


def _static(**kwargs) -> tuple[tuple[str, Any], ...]:
  return tuple(sorted(kwargs.items()))


_PROGRAMS: dict[Program, concurrent.futures.Future] = {}
_PROGRAMS_LOCK = threading.Lock()


def _program(program: Program, wait: bool = True):
  """The compiled executable of `program`: compiled here if no thread has started it, else the other thread's
  (waited for; with `wait=False`, None at once). A failed compile is forgotten, so the next caller retries."""
  with _PROGRAMS_LOCK:
    future = _PROGRAMS.get(program)
    mine = future is None
    if mine:
      future = _PROGRAMS[program] = concurrent.futures.Future()
  if not mine:
    return future.result() if wait else None
  try:
    future.set_result(_compile(program))
  except BaseException as e:
    with _PROGRAMS_LOCK:
      del _PROGRAMS[program]
    future.set_exception(e)
    raise
  return future.result()


def _compile(program: Program):
  import jax

  name, args, static = program
  sharding = jax.sharding.SingleDeviceSharding(_host_device())
  specs = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in args]
  return _jit(name).lower(*specs, **dict(static)).compile()


def _run(program: Program, *args: np.ndarray, host: bool = True):
  """Run `program` on the CPU device; a numpy array (host=False: the jax.Array, to feed another program)."""
  import jax

  device = _host_device()
  out = _program(program)(*(jax.device_put(a, device) for a in args))
  return np.asarray(out) if host else out


_FP8_MIN_CODE = 2.0**-9  # the smallest nonzero |e4m3| value (a subnormal of e4m3, a normal float32)


def _normal_products(scale: np.ndarray, smallest: float) -> bool:
  """Whether no nonzero code (≥ `smallest` in magnitude) times a scale is a float32 subnormal. XLA on the CPU
  flushes subnormals to zero (inputs and results); numpy keeps them. Real scales are ~1e-4: XLA's result is then
  the same bit for bit; otherwise (tests' tiny scales) the numpy path keeps today's bits."""
  a = np.abs(scale)
  return not np.any((a > 0) & (a * np.float32(smallest) < np.finfo(np.float32).tiny))


@functools.cache
def _host_device():
  try:
    import jax

    return jax.devices("cpu")[0]
  except Exception:  # no CPU backend (JAX_PLATFORMS without cpu): numpy
    return None


@functools.cache
def _jit(name: str):
  import jax
  import jax.numpy as jnp

  def transpose(x):
    return x.T

  def fp8_decode(q, s, *, bc: int, axis: int, dtype: np.dtype):
    """q: [n, m] uint8 codes; s: the f32 scale per row of q, per block of `bc` along `axis` ([n/bc, m] for axis
    0, [n, m/bc] for axis 1, the last block partial)."""
    x = jax.lax.bitcast_convert_type(q, jnp.float8_e4m3fn).astype(jnp.float32)
    n = q.shape[axis]
    if n % bc == 0:  # the common case: blocks by reshape (no index arithmetic)
      if axis == 0:
        x = (x.reshape(n // bc, bc, q.shape[1]) * s[:, None, :]).reshape(q.shape)
      else:
        x = (x.reshape(q.shape[0], n // bc, bc) * s[:, :, None]).reshape(q.shape)
    else:
      x = x * jax.lax.slice_in_dim(jnp.repeat(s, bc, axis=axis), 0, n, axis=axis)
    return x.astype(dtype)

  def int4_decode(w, s, *, group: int, axis: int, dtype: np.dtype):
    """w: uint32 words, 8 nibbles each along `axis`; s: f32 scales per `group` values along `axis`."""
    shifts = jnp.arange(0, 32, 4, dtype=jnp.uint32)
    if axis == 0:  # w [C/8, R] -> [C/8, 8, R]
      nib = (w[:, None, :] >> shifts[None, :, None]) & 0xF
      x = (nib.astype(jnp.int32) - 8).astype(jnp.float32).reshape(-1, group, w.shape[1]) * s[:, None, :]
      return x.reshape(-1, w.shape[1]).astype(dtype)
    nib = (w[:, :, None] >> shifts[None, None, :]) & 0xF  # w [R, C/8] -> [R, C/8, 8]
    x = (nib.astype(jnp.int32) - 8).astype(jnp.float32).reshape(w.shape[0], -1, group) * s[:, :, None]
    return x.reshape(w.shape[0], -1).astype(dtype)

  fns = {
    "transpose": (transpose, ()),
    "fp8": (fp8_decode, ("bc", "axis", "dtype")),
    "int4": (int4_decode, ("group", "axis", "dtype")),
  }
  fn, static = fns[name]
  return jax.jit(fn, static_argnames=static)
