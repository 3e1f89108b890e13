"""Operand preparation shared by the TPU and GPU grouped-matmul kernels: common dtype, tile sizes, padding.

Dimensions: M rows, K contraction, N output columns; tm/tk/tn tiles; mp/kp/np the padded sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels._common import round_up

Tiling = tuple[int, int, int]


class Operands(NamedTuple):
  a: jax.Array  # lhs [mp, kp]
  b: jax.Array  # gmm: rhs [G, kp, np] ([G, np, kp] transposed); tgmm: dout [mp, np]
  tiles: Tiling  # (tm, tk, tn)
  shape: tuple[int, int, int]  # unpadded (m, k, n)
  padded: tuple[int, int, int]  # (mp, kp, np)
  out_dtype: jnp.dtype


def pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def precision(dtype) -> lax.Precision:
  """f32 inputs get a true f32 matmul (the reference's numerics, not TF32/bf16 passes); bf16 runs natively.
  Explicit, so a global jax_default_matmul_precision cannot change a kernel."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _resolve(m, k, n, dtype, tiling, default_tiling, out_dtype):
  tiles = tuple(tiling or default_tiling(m, k, n, dtype))
  padded = tuple(round_up(d, t) for d, t in zip((m, k, n), tiles))
  return tiles, padded, jnp.dtype(out_dtype or dtype)


def gmm_operands(
  lhs, rhs, *, transpose_rhs: bool, tiling: Tiling | None, default_tiling: Callable[..., Tiling], out_dtype
) -> Operands:
  """lhs [M, K], rhs [G, K, N] (or [G, N, K]) cast to their common dtype and padded to whole tiles."""
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  dtype = jnp.result_type(lhs.dtype, rhs.dtype)
  tiles, (mp, kp, np_), out_dtype = _resolve(m, k, n, dtype, tiling, default_tiling, out_dtype)
  lhs = pad_to(pad_to(lhs.astype(dtype), 0, mp), 1, kp)
  rhs = pad_to(pad_to(rhs.astype(dtype), 1, np_ if transpose_rhs else kp), 2, kp if transpose_rhs else np_)
  return Operands(lhs, rhs, tiles, (m, k, n), (mp, kp, np_), out_dtype)


def tgmm_operands(lhs, dout, *, tiling: Tiling | None, default_tiling: Callable[..., Tiling], out_dtype) -> Operands:
  """lhs [M, K] and dout [M, N] cast to their common dtype and padded to whole tiles."""
  (m, k), n = lhs.shape, dout.shape[1]
  dtype = jnp.result_type(lhs.dtype, dout.dtype)
  tiles, (mp, kp, np_), out_dtype = _resolve(m, k, n, dtype, tiling, default_tiling, out_dtype)
  lhs = pad_to(pad_to(lhs.astype(dtype), 0, mp), 1, kp)
  dout = pad_to(pad_to(dout.astype(dtype), 0, mp), 1, np_)
  return Operands(lhs, dout, tiles, (m, k, n), (mp, kp, np_), out_dtype)
