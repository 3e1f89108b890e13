"""Work lists for the grouped-matmul kernels (computed in XLA, consumed by TPU and GPU kernels).

Dimensions: M rows of lhs (padded to a multiple of tm), G local groups (rhs groups),
GT all groups (len(group_sizes)), W work items (static bound = M/tm + G - 1).

Rows of lhs are grouped contiguously: group g owns rows [start_g, end_g) with
end = cumsum(group_sizes). With expert parallelism only groups [offset, offset + G)
are local; their rows form ONE contiguous range [S, E), so every row outside it
(and every row past sum(group_sizes)) produces zeros.

A work item is one (m-tile, group) pair. Its kind says what the kernel does:
  0 = padding (the list has a static length; padding repeats the last real item's
      block indices so no new data is fetched, and is skipped),
  1 = zero-fill (rows [lo, hi) of the tile get zeros, no matmul),
  2 = compute (rows [glo, ghi) of the tile get lhs @ rhs[group]; rows of [lo, hi)
      outside [glo, ghi) get zeros).
Items are sorted by m-tile, so a TPU output block is only revisited on consecutive
grid steps, and the store ranges [lo, hi) of a tile's items partition the tile.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp


class GroupBounds(NamedTuple):
  """Row ranges of the local groups: starts, ends: [G] int32."""

  starts: jax.Array
  ends: jax.Array


class WorkItems(NamedTuple):
  """Per-item int32 arrays, each [W]."""

  kind: jax.Array  # 0 padding, 1 zero-fill, 2 compute
  group: jax.Array  # local group index (rhs block / tgmm output block)
  tile: jax.Array  # m-tile index
  lo: jax.Array  # store rows [lo, hi) (gmm)
  hi: jax.Array
  glo: jax.Array  # group rows [glo, ghi) (rows that get a matmul result)
  ghi: jax.Array
  first: jax.Array  # 1 on the first item of a group (tgmm: reset the accumulator)
  last: jax.Array  # 1 on the last item of a group (tgmm: store the accumulator)


def local_group_bounds(group_sizes: jax.Array, group_offset: jax.Array | int, num_local: int, m: int) -> GroupBounds:
  """Row range of each local group; ends are clamped to `m` (the real row count).

  group_sizes: [GT] int32; group_offset: scalar; requires offset + num_local <= GT.
  """
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m).astype(jnp.int32)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  offset = jnp.asarray(group_offset, jnp.int32).reshape(())
  return GroupBounds(
    lax.dynamic_slice_in_dim(starts, offset, num_local), lax.dynamic_slice_in_dim(ends, offset, num_local)
  )


def _expand(seg_first, seg_count, num_items):
  """Lays segments (runs of consecutive tiles) out as items.

  Returns (item index clamped to the last real item, segment of each item,
  tile of each item, is-padding, is-first-of-segment, is-last-of-segment).
  """
  seg_end = jnp.cumsum(seg_count)
  seg_start = seg_end - seg_count
  total = seg_end[-1]
  i = jnp.arange(num_items, dtype=jnp.int32)
  ii = jnp.minimum(i, total - 1)
  # First segment whose end is past ii; empty segments are skipped by side="right".
  seg = jnp.searchsorted(seg_end, ii, side="right").astype(jnp.int32)
  seg = jnp.minimum(seg, seg_count.shape[0] - 1)
  tile = seg_first[seg] + ii - seg_start[seg]
  return seg, tile, i >= total, ii == seg_start[seg], ii == seg_end[seg] - 1


def gmm_work_items(bounds: GroupBounds, *, tm: int, tiles_m: int) -> WorkItems:
  """Items covering every m-tile: compute items for local groups, zero-fill elsewhere."""
  gs, ge = bounds
  num_local = gs.shape[0]
  s, e = gs[0], ge[-1]
  nonempty = ge > gs
  ft = gs // tm
  nt = jnp.where(nonempty, (ge - 1) // tm - ft + 1, 0)
  any_rows = e > s
  a = jnp.where(any_rows, s // tm, tiles_m)  # zero tiles [0, a)
  b = jnp.where(any_rows, (e - 1) // tm + 1, tiles_m)  # zero tiles [b, tiles_m)
  zero = jnp.zeros((1,), jnp.int32)
  cat = lambda x, y, z: jnp.concatenate([jnp.reshape(x, (1,)), y, jnp.reshape(z, (1,))]).astype(jnp.int32)
  seg_first = cat(zero, ft, b)
  seg_count = cat(a, nt, tiles_m - b)
  seg_group = cat(zero, jnp.arange(num_local), num_local - 1)
  seg_glo = cat(zero, gs, zero)
  seg_ghi = cat(zero, ge, zero)

  seg, tile, pad, _, _ = _expand(seg_first, seg_count, tiles_m + num_local - 1)
  is_zero = (seg == 0) | (seg == num_local + 1)
  glo, ghi = seg_glo[seg], seg_ghi[seg]
  t0 = tile * tm
  lo = jnp.maximum(glo, t0)
  hi = jnp.minimum(ghi, t0 + tm)
  # Rows of the boundary tiles outside [S, E) are zero-filled by the item next to them.
  lo = jnp.where(is_zero | (lo == s), t0, lo)
  hi = jnp.where(is_zero | (hi == e), t0 + tm, hi)
  kind = jnp.where(pad, 0, jnp.where(is_zero, 1, 2)).astype(jnp.int32)
  one = jnp.ones_like(kind)
  return WorkItems(kind, seg_group[seg], tile, lo, hi, glo, ghi, one, one)


def tgmm_work_items(bounds: GroupBounds, *, tm: int, tiles_m: int) -> WorkItems:
  """Items per local group (its m-tiles, or one zero item for an empty group), group-major."""
  gs, ge = bounds
  num_local = gs.shape[0]
  nonempty = ge > gs
  ft = jnp.minimum(gs // tm, tiles_m - 1)
  nt = jnp.where(nonempty, (ge - 1) // tm - ft + 1, 1)
  seg, tile, pad, first, last = _expand(ft.astype(jnp.int32), nt.astype(jnp.int32), tiles_m + num_local - 1)
  kind = jnp.where(pad, 0, jnp.where(nonempty[seg], 2, 1)).astype(jnp.int32)
  glo, ghi = gs[seg], ge[seg]
  return WorkItems(kind, seg, tile, glo, ghi, glo, ghi, first.astype(jnp.int32), last.astype(jnp.int32))
