"""Grouped matmul kernels for TPU (Pallas / Mosaic).

Dimensions: M rows, K contraction, N output columns, G local groups, W work items;
tm, tk, tn tile sizes. See metadata.py for the work-item list both kernels walk.

gmm:  grid (N/tn, W, K/tk). The work list (scalar-prefetched into SMEM) picks the
      lhs m-tile and the rhs group of each step; K is the innermost (reduction) axis
      with an f32 VMEM accumulator; the output tile is merged under a row mask on
      the last K step, so tiles shared by two groups are written by both in turn.
tgmm: grid (K/tk, N/tn, W). Each item adds lhs_tile^T @ dout_tile (rows of its
      group only) into the accumulator of the group's [tk, tn] output block; the
      block is stored on the group's last item.
Non-compute items (zero-fill, padding) point their input blocks at the previous
step's blocks, so the pipeline issues no DMA for them.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels._common import pick_tile, round_up
from pallas_kernels.grouped_matmul import metadata
from pallas_kernels.grouped_matmul.operands import gmm_operands, precision, tgmm_operands


def default_tiling(m: int, k: int, n: int, dtype) -> tuple[int, int, int]:
  """(tm, tk, tn): MXU-sized tiles; small dims use one full-size block (always legal)."""
  sublane = 16 if jnp.dtype(dtype).itemsize == 2 else 8
  tm = min(512, round_up(m, sublane))
  tk = pick_tile(k, (512, 256, 128), full_max=1024)
  tn = pick_tile(n, (512, 256, 128), full_max=1024)
  return tm, tk, tn


def _fetch_indices(items: metadata.WorkItems):
  """Tile/group to fetch per item: the item's own for compute items, else the last
  compute item's (tiles and groups are nondecreasing over compute items)."""
  compute = items.kind == 2
  ftile = lax.cummax(jnp.where(compute, items.tile, 0))
  fgroup = lax.cummax(jnp.where(compute, items.group, 0))
  return ftile, fgroup


def gmm(lhs, rhs, group_sizes, *, group_offset=0, out_dtype=None, tiling=None, transpose_rhs=False, interpret=False):
  """out[M, N] = per-group lhs @ rhs[g]; rows outside local groups are zero.

  lhs: [M, K]; rhs: [G, K, N] ([G, N, K] if transpose_rhs); group_sizes: [GT] int32;
  group_offset: scalar (first local group). Accumulates in f32.
  """
  num_local = rhs.shape[0]
  ops = gmm_operands(
    lhs, rhs, transpose_rhs=transpose_rhs, tiling=tiling, default_tiling=default_tiling, out_dtype=out_dtype
  )
  lhs, rhs, (tm, tk, tn), (m, k, n), (mp, kp, np_), out_dtype = ops
  tiles_m, nk = mp // tm, kp // tk

  bounds = metadata.local_group_bounds(group_sizes, group_offset, num_local, m)
  items = metadata.gmm_work_items(bounds, tm=tm, tiles_m=tiles_m)
  ftile, fgroup = _fetch_indices(items)
  prefetch = (items.kind, items.tile, ftile, fgroup, items.lo, items.hi, items.glo, items.ghi)

  def k_eff(i, kk, kind_ref):
    # Non-compute items keep the last K block so the pipeline re-uses it.
    return jnp.where(kind_ref[i] == 2, kk, nk - 1)

  def lhs_map(j, i, kk, kind, tile, ftile, fgroup, *_):
    return ftile[i], k_eff(i, kk, kind)

  def rhs_map(j, i, kk, kind, tile, ftile, fgroup, *_):
    if transpose_rhs:
      return fgroup[i], j, k_eff(i, kk, kind)
    return fgroup[i], k_eff(i, kk, kind), j

  def out_map(j, i, kk, kind, tile, *_):
    return tile[i], j

  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  kernel = functools.partial(
    _gmm_kernel, tm=tm, nk=nk, rhs_contract=1 if transpose_rhs else 0, precision=precision(lhs.dtype)
  )
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(prefetch),
      grid=(np_ // tn, items.kind.shape[0], nk),
      in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
      out_specs=pl.BlockSpec((tm, tn), out_map),
      scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
    ),
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
    cost_estimate=pl.CostEstimate(
      flops=2 * m * k * n,
      transcendentals=0,
      bytes_accessed=lhs.size * lhs.itemsize * (np_ // tn)
      + rhs.size * rhs.itemsize
      + mp * np_ * jnp.dtype(out_dtype).itemsize,
    ),
    interpret=interpret,
    name="gmm_tpu",
  )(*prefetch, lhs, rhs)
  return out[:m, :n]


def _gmm_kernel(
  kind_ref,
  tile_ref,
  ftile_ref,
  fgroup_ref,
  lo_ref,
  hi_ref,
  glo_ref,
  ghi_ref,
  lhs_ref,
  rhs_ref,
  out_ref,
  acc_ref,
  *,
  tm,
  nk,
  rhs_contract,
  precision,
):
  del ftile_ref, fgroup_ref
  i, kk = pl.program_id(1), pl.program_id(2)
  kind = kind_ref[i]

  @pl.when(kk == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(kind == 2)
  def _accumulate():
    acc_ref[...] += lax.dot_general(
      lhs_ref[...],
      rhs_ref[...],
      (((1,), (rhs_contract,)), ((), ())),
      preferred_element_type=jnp.float32,
      precision=precision,
    )

  @pl.when((kk == nk - 1) & (kind != 0))
  def _store():
    rows = tile_ref[i] * tm + lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
    in_group = (rows >= glo_ref[i]) & (rows < ghi_ref[i])
    in_store = (rows >= lo_ref[i]) & (rows < hi_ref[i])
    value = jnp.where(in_group, acc_ref[...], 0.0)
    # Rows outside [lo, hi) belong to another item of this tile: keep what is there.
    out_ref[...] = jnp.where(in_store, value, out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


def tgmm(lhs, dout, group_sizes, *, num_groups, group_offset=0, out_dtype=None, tiling=None, interpret=False):
  """out[G, K, N] = per-group lhs[rows of g]^T @ dout[rows of g]; empty groups give 0.

  lhs: [M, K]; dout: [M, N]; group_sizes: [GT] int32; num_groups = G (local groups).
  """
  ops = tgmm_operands(lhs, dout, tiling=tiling, default_tiling=default_tiling, out_dtype=out_dtype)
  lhs, dout, (tm, tk, tn), (m, k, n), (mp, kp, np_), out_dtype = ops

  bounds = metadata.local_group_bounds(group_sizes, group_offset, num_groups, m)
  items = metadata.tgmm_work_items(bounds, tm=tm, tiles_m=mp // tm)
  ftile, _ = _fetch_indices(items)
  prefetch = (items.kind, items.group, ftile, items.glo, items.ghi, items.first, items.last)

  def lhs_map(kb, nb, i, kind, group, ftile, *_):
    return ftile[i], kb

  def dout_map(kb, nb, i, kind, group, ftile, *_):
    return ftile[i], nb

  def out_map(kb, nb, i, kind, group, *_):
    return group[i], kb, nb

  kernel = functools.partial(_tgmm_kernel, tm=tm, precision=precision(lhs.dtype))
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(prefetch),
      grid=(kp // tk, np_ // tn, items.kind.shape[0]),
      in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), dout_map)],
      out_specs=pl.BlockSpec((None, tk, tn), out_map),
      scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
    ),
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    cost_estimate=pl.CostEstimate(
      flops=2 * m * k * n,
      transcendentals=0,
      bytes_accessed=lhs.size * lhs.itemsize * (np_ // tn)
      + dout.size * dout.itemsize * (kp // tk)
      + num_groups * kp * np_ * jnp.dtype(out_dtype).itemsize,
    ),
    interpret=interpret,
    name="tgmm_tpu",
  )(*prefetch, lhs, dout)
  return out[:, :k, :n]


def _tgmm_kernel(
  kind_ref,
  group_ref,
  ftile_ref,
  glo_ref,
  ghi_ref,
  first_ref,
  last_ref,
  lhs_ref,
  dout_ref,
  out_ref,
  acc_ref,
  *,
  tm,
  precision,
):
  del group_ref
  i = pl.program_id(2)
  kind = kind_ref[i]

  @pl.when((kind != 0) & (first_ref[i] == 1))
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(kind == 2)
  def _accumulate():
    row0 = ftile_ref[i] * tm
    lo, hi = glo_ref[i], ghi_ref[i]
    x, dy = lhs_ref[...], dout_ref[...]
    rows_x = row0 + lax.broadcasted_iota(jnp.int32, x.shape, 0)
    rows_dy = row0 + lax.broadcasted_iota(jnp.int32, dy.shape, 0)
    # Mask both sides: rows of other groups must not leak (and 0 * inf would be nan).
    x = jnp.where((rows_x >= lo) & (rows_x < hi), x, jnp.zeros((), x.dtype))
    dy = jnp.where((rows_dy >= lo) & (rows_dy < hi), dy, jnp.zeros((), dy.dtype))
    acc_ref[...] += lax.dot_general(
      x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
    )

  @pl.when((kind != 0) & (last_ref[i] == 1))
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)
