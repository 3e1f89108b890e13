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

import dataclasses
import math
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
  wq: np.ndarray, scale: np.ndarray, block: tuple[int, int], row0: int = 0, *, transpose: bool = False
) -> np.ndarray:
  """wq: [r, C] float8_e4m3fn, rows row0.. of the weight; scale: [ceil(R/br), ceil(C/bc)] f32
  -> [r, C] f32, or [C, r] with `transpose` (C-contiguous either way)."""
  br, bc = block
  out = transpose_cast(wq, np.float32, transpose)
  col_scale = np.repeat(scale.astype(np.float32), bc, axis=1)[:, : wq.shape[1]]  # [ceil(R/br), C]
  for b in range(row0 // br, (row0 + wq.shape[0] - 1) // br + 1):  # the block rows these rows touch
    rows = slice(max(b * br - row0, 0), (b + 1) * br - row0)
    if transpose:
      out[:, rows] *= col_scale[b][:, None]
    else:
      out[rows] *= col_scale[b]
  return out


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
  packed: np.ndarray, scale: np.ndarray, columns: int, group: int, *, transpose: bool = False
) -> np.ndarray:
  """packed: [R, C/8] int32; scale: [R, C/G] -> W: [R, C] f32, or [C, R] with `transpose`."""
  q = int4_unpack(packed, columns, transpose=transpose).astype(np.float32)
  scale = scale.astype(np.float32)
  if transpose:
    return (q.reshape(-1, group, q.shape[1]) * scale.T[:, None, :]).reshape(q.shape)
  return (q.reshape(q.shape[0], -1, group) * scale[:, :, None]).reshape(q.shape)
