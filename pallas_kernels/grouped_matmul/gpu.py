"""Grouped matmul kernels for GPU (Pallas, Triton lowering).

Dimensions: M rows, K contraction, N output columns, G local groups, W work items;
tm, tk, tn tile sizes (powers of two for Triton; inputs are zero-padded to them).

gmm:  grid (W, N/tn); one program per (work item, n-tile) walks K in a loop with an
      f32 register accumulator (Triton software-pipelines the loop and emits
      wgmma/mma for the dot). The Triton lowering has no scalar prefetch, so the
      work list (metadata.py) arrives as ordinary int32 inputs, and lhs/rhs/out are
      indexed by hand. Programs of one m-tile (two groups sharing the tile) run
      concurrently but store disjoint row ranges under a mask.
tgmm: grid (K/tk, N/tn, G); one program per local group and output tile loops over
      the group's m-tiles (none for an empty group: it stores zeros).
Offsets are int32 inside Triton: keep G*K*N (local rhs) below 2**31 elements.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import metadata
from pallas_kernels.grouped_matmul.operands import gmm_operands, precision, tgmm_operands


def default_tiling(m: int, k: int, n: int, dtype) -> tuple[int, int, int]:
  """(tm, tk, tn) for H100-class GPUs: 64/128-row tiles, 64-wide K steps (bf16)."""
  del k, n
  tm = 128 if m >= 4096 else 64
  tk = 64 if jnp.dtype(dtype).itemsize == 2 else 32
  return tm, tk, 128


def _params(num_warps=4, num_stages=3):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def gmm(lhs, rhs, group_sizes, *, group_offset=0, out_dtype=None, tiling=None, transpose_rhs=False, interpret=False):
  """out[M, N] = per-group lhs @ rhs[g]; rows outside local groups are zero.

  lhs: [M, K]; rhs: [G, K, N] ([G, N, K] if transpose_rhs); group_sizes: [GT] int32.
  """
  num_local = rhs.shape[0]
  ops = gmm_operands(
    lhs, rhs, transpose_rhs=transpose_rhs, tiling=tiling, default_tiling=default_tiling, out_dtype=out_dtype
  )
  lhs, rhs, (tm, tk, tn), (m, k, n), (mp, kp, np_), out_dtype = ops

  bounds = metadata.local_group_bounds(group_sizes, group_offset, num_local, m)
  items = metadata.gmm_work_items(bounds, tm=tm, tiles_m=mp // tm)
  meta = (items.kind, items.group, items.tile, items.lo, items.hi, items.glo, items.ghi)
  kernel = functools.partial(
    _gmm_kernel, tm=tm, tk=tk, tn=tn, nk=kp // tk, transpose_rhs=transpose_rhs, precision=precision(lhs.dtype)
  )
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
    grid=(items.kind.shape[0], np_ // tn),
    compiler_params=_params(),
    interpret=interpret,
    name="gmm_gpu",
  )(*meta, lhs, rhs)
  return out[:m, :n]


def _gmm_kernel(
  kind_ref,
  group_ref,
  tile_ref,
  lo_ref,
  hi_ref,
  glo_ref,
  ghi_ref,
  lhs_ref,
  rhs_ref,
  out_ref,
  *,
  tm,
  tk,
  tn,
  nk,
  transpose_rhs,
  precision,
):
  i, j = pl.program_id(0), pl.program_id(1)
  kind = kind_ref[i]

  @pl.when(kind != 0)
  def _run():
    g = group_ref[i]
    row0 = tile_ref[i] * tm
    col0 = j * tn

    def body(kk, acc):
      x = lhs_ref[pl.ds(row0, tm), pl.ds(kk * tk, tk)]
      if transpose_rhs:
        w = rhs_ref[g, pl.ds(col0, tn), pl.ds(kk * tk, tk)]
        dims = (((1,), (1,)), ((), ()))
      else:
        w = rhs_ref[g, pl.ds(kk * tk, tk), pl.ds(col0, tn)]
        dims = (((1,), (0,)), ((), ()))
      return acc + lax.dot_general(x, w, dims, preferred_element_type=jnp.float32, precision=precision)

    # Zero-fill items run no K steps. Typed scalars: the Triton lowering gives a weakly typed literal in a scalar
    # select the predicate's type (i1), which Triton rejects (see pallas_kernels/README.md, GPU route).
    steps = jnp.where(kind == 2, jnp.int32(nk), jnp.int32(0))
    acc = lax.fori_loop(0, steps, body, jnp.zeros((tm, tn), jnp.float32))
    rows = row0 + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
    in_group = (rows >= glo_ref[i]) & (rows < ghi_ref[i])
    in_store = (rows >= lo_ref[i]) & (rows < hi_ref[i])
    value = jnp.where(in_group, acc, 0.0).astype(out_ref.dtype)
    plgpu.store(out_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)], value, mask=in_store)


def tgmm(lhs, dout, group_sizes, *, num_groups, group_offset=0, out_dtype=None, tiling=None, interpret=False):
  """out[G, K, N] = per-group lhs[rows of g]^T @ dout[rows of g]; empty groups give 0.

  lhs: [M, K]; dout: [M, N]; group_sizes: [GT] int32; num_groups = G.
  """
  ops = tgmm_operands(lhs, dout, tiling=tiling, default_tiling=default_tiling, out_dtype=out_dtype)
  lhs, dout, (tm, tk, tn), (m, k, n), (mp, kp, np_), out_dtype = ops
  gs, ge = metadata.local_group_bounds(group_sizes, group_offset, num_groups, m)

  kernel = functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn, precision=precision(lhs.dtype))
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype),
    grid=(kp // tk, np_ // tn, num_groups),
    in_specs=[pl.no_block_spec] * 4,
    out_specs=pl.BlockSpec((None, tk, tn), lambda kb, nb, g: (g, kb, nb)),
    compiler_params=_params(),
    interpret=interpret,
    name="tgmm_gpu",
  )(gs, ge, lhs, dout)
  return out[:, :k, :n]


def _tgmm_kernel(gs_ref, ge_ref, lhs_ref, dout_ref, out_ref, *, tm, tk, tn, precision):
  kb, nb, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  lo, hi = gs_ref[g], ge_ref[g]
  first = lo // tm
  num_tiles = jnp.where(hi > lo, (hi - 1) // tm - first + 1, jnp.int32(0))  # typed 0: see _gmm_kernel

  def body(t, acc):
    row0 = (first + t) * tm
    x = lhs_ref[pl.ds(row0, tm), pl.ds(kb * tk, tk)]
    dy = dout_ref[pl.ds(row0, tm), pl.ds(nb * tn, tn)]
    rx = row0 + lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
    ry = row0 + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
    # Mask both sides: rows of other groups must not leak (and 0 * inf would be nan).
    x = jnp.where((rx >= lo) & (rx < hi), x, jnp.zeros((), x.dtype))
    dy = jnp.where((ry >= lo) & (ry < hi), dy, jnp.zeros((), dy.dtype))
    return acc + lax.dot_general(
      x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
    )

  acc = lax.fori_loop(0, num_tiles, body, jnp.zeros((tk, tn), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)
