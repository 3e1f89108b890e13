"""Routed-expert compute behind one function, `routed_experts(..., impl=)`.

Letters: the package's (kimi_jax/__init__.py): N tokens, D model, E experts, K experts per token, Fe expert
hidden, P = N·K (token, expert) pairs; here also G tiles and M rows per tile (blocked impl).

Every impl computes, for each token t, sum_k w[t,k] · down_e(silu(gate_e(x_t)) * up_e(x_t)) with
e = idx[t,k], summed in float32 like transformers, and returns [N, D] in x's dtype.
  dense    every expert on every token, then a weighted combine: the reference (E/K × the FLOPs).
  ragged   pairs sorted by expert and `jax.lax.ragged_dot`: exact FLOPs on TPU/GPU; XLA:CPU expands it to
           a dense masked product (E × the FLOPs of the pairs).
  blocked  pairs sorted by expert, each expert's run padded to M-row tiles, one batched matmul over tiles
           with each tile's expert weights gathered: exact and dropless at ≤ P + E·M rows of work. The fast
           path on CPU.
  pallas   the grouped-matmul Pallas kernel (pallas_kernels.gmm) on sorted pairs.
  auto     `backend.resolve("moe", ...)`: blocked on CPU, pallas on TPU, ragged on GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kimi_jax import backend, sharding

BLOCK_ROWS = 128  # M for the blocked impl: large enough for efficient matmuls, small enough to bound padding.
_IN_BOUNDS = "promise_in_bounds"
_PERMUTATION = dict(mode=_IN_BOUNDS, unique_indices=True)  # for indices that are distinct and in range


def routed_experts(
  x: jax.Array,
  idx: jax.Array,
  weights: jax.Array,
  gate: jax.Array,
  up: jax.Array,
  down: jax.Array,
  *,
  impl: str,
  capacity_factor: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """x: [N, D]; idx: [N, K] int; weights: [N, K] f32; gate, up: [E, D, Fe]; down: [E, Fe, D].

  Returns ([N, D], dropped (token, expert) pairs: int32 scalar). Under a mesh whose `expert` axis has more
  than one device, the experts run expert-parallel (`kimi_jax.expert_parallel`) with this impl's grouped
  matmul on each device's local experts, dropping pairs only if `capacity_factor` bounds the buffers.
  """
  impl = backend.resolve("moe", impl)
  mesh = sharding.active_mesh()
  if impl != "dense" and mesh is not None and mesh.shape["expert"] > 1:
    from kimi_jax.expert_parallel import expert_parallel_moe

    out, dropped = expert_parallel_moe(
      x,
      idx,
      weights,
      gate,
      up,
      down,
      mesh=mesh,
      tensor_axis="tensor",
      token_axes=sharding.BATCH_AXES,
      capacity_factor=capacity_factor,
      matmul=GROUPED_MATMULS[impl],
      check_vma=impl != "pallas",
    )  # pallas_call outputs carry no varying axes
    return out.astype(x.dtype), dropped
  no_drops = jnp.zeros((), jnp.int32)
  if impl == "dense":
    return _dense(x, idx, weights, gate, up, down), no_drops
  t, k = idx.shape
  flat_expert = idx.reshape(-1)
  order = jnp.argsort(flat_expert, stable=True)  # [P] pair ids sorted by expert
  token = order // k
  group_sizes = jnp.bincount(flat_expert, length=gate.shape[0]).astype(jnp.int32)
  # Every index below is in range, and the sort order and the tile rows are permutations: saying so (`_IN_BOUNDS`,
  # unique_indices) spares the out-of-bounds masks and the generic scatter JVP (an id scatter, a gather and an
  # [P, D] compare per layer), the same values at a fraction of the work on CPU.
  xs = x.at[token].get(mode=_IN_BOUNDS)  # [P, D]
  if impl == "blocked":
    ys = _blocked_ffn(xs, group_sizes, gate, up, down)
  else:
    matmul = GROUPED_MATMULS[impl]
    hidden = jax.nn.silu(matmul(xs, gate, group_sizes)) * matmul(xs, up, group_sizes)
    ys = matmul(hidden, down, group_sizes)
  # Un-sort with the inverse permutation, then combine each token's K outputs in float32.
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype), **_PERMUTATION)
  ys = ys.at[inverse].get(**_PERMUTATION).reshape(t, k, -1).astype(jnp.float32)
  return combine(ys, weights).astype(x.dtype), no_drops


def combine(ys: jax.Array, weights: jax.Array) -> jax.Array:
  """ys: [N, K, D] f32 expert outputs; weights: [N, K] f32 -> [N, D] f32, sum_k w·y in true float32 (the default
  dot precision is one bf16 pass on TPU, TF32 on GPU; transformers combines in float32)."""
  with jax.named_scope("expert_combine"):  # the name tests find in compiled HLO
    return jnp.einsum("tkd,tk->td", ys, weights, precision=jax.lax.Precision.HIGHEST)


def _dense(x, idx, weights, gate, up, down):
  hidden = jax.nn.silu(jnp.einsum("td,edf->tef", x, gate)) * jnp.einsum("td,edf->tef", x, up)
  ys = jnp.einsum("tef,efd->ted", hidden, down).astype(jnp.float32)
  t = x.shape[0]
  combine = jnp.zeros((t, gate.shape[0]), jnp.float32).at[jnp.arange(t)[:, None], idx].add(weights)
  return jnp.einsum("ted,te->td", ys, combine, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def _ragged_dot(xs, w, group_sizes):
  return jax.lax.ragged_dot(xs, w, group_sizes)


def _pallas_gmm(xs, w, group_sizes):
  import pallas_kernels  # standalone package; imported only when this impl is chosen

  return pallas_kernels.gmm(xs, w, group_sizes, **backend.pallas_options())


class _Tiles(NamedTuple):
  """Where each of P expert-sorted rows sits when every expert's run is padded to whole M-row tiles."""

  row: jax.Array  # [P] row in the tiled layout [G·M]
  expert: jax.Array  # [G] expert of each tile (tiles past the last group: the last expert, rows all zero)
  rows_per_tile: int


def _tiles(group_sizes: jax.Array, n: int) -> _Tiles:
  num_experts = group_sizes.shape[0]
  m = min(BLOCK_ROWS, max(8, n))
  num_tiles = -(-n // m) + num_experts  # static bound on sum_e ceil(size_e / M)
  padded_sizes = -(-group_sizes // m) * m
  padded_start = jnp.cumsum(padded_sizes) - padded_sizes
  start = jnp.cumsum(group_sizes) - group_sizes
  expert_of_row = jnp.repeat(jnp.arange(num_experts), group_sizes, total_repeat_length=n)
  row = padded_start[expert_of_row] + jnp.arange(n) - start[expert_of_row]
  tile_expert = jnp.searchsorted(jnp.cumsum(padded_sizes), jnp.arange(num_tiles) * m, side="right")
  return _Tiles(row, jnp.minimum(tile_expert, num_experts - 1), m)


def _to_tiles(xs: jax.Array, tiles: _Tiles) -> jax.Array:
  """[P, D] -> [G, M, D], zero rows as padding."""
  num_tiles = tiles.expert.shape[0]
  out = jnp.zeros((num_tiles * tiles.rows_per_tile, xs.shape[1]), xs.dtype).at[tiles.row].set(xs, **_PERMUTATION)
  return out.reshape(num_tiles, tiles.rows_per_tile, xs.shape[1])


def _from_tiles(y: jax.Array, tiles: _Tiles) -> jax.Array:
  """[G, M, D] -> [P, D]."""
  return y.reshape(-1, y.shape[-1]).at[tiles.row].get(**_PERMUTATION)


def _tile_weights(w: jax.Array, tiles: _Tiles) -> jax.Array:
  """w: [E, in, out] -> [G, in, out], each tile's expert's weights (tile experts are in range and non-decreasing)."""
  return w.at[tiles.expert].get(mode=_IN_BOUNDS, indices_are_sorted=True)


def _blocked_matmul(xs: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """Grouped matmul by tiles. xs: [P, in] sorted by group; w: [E, in, out] -> [P, out] (rows past the groups: 0)."""
  n = xs.shape[0]
  valid = jnp.arange(n) < jnp.sum(group_sizes)
  # Rows past sum(group_sizes) join the last group here and are zeroed after.
  sizes = group_sizes.at[-1].add(n - jnp.sum(group_sizes))
  tiles = _tiles(sizes, n)
  out = _from_tiles(jnp.einsum("gmk,gkf->gmf", _to_tiles(xs, tiles), _tile_weights(w, tiles)), tiles)
  return jnp.where(valid[:, None], out, 0)


def _blocked_ffn(xs: jax.Array, group_sizes: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  """xs: [P, D] sorted by expert with `group_sizes` [E] -> [P, D]: the expert FFN of each row, one tiling."""
  tiles = _tiles(group_sizes, xs.shape[0])
  tiled = _to_tiles(xs, tiles)
  hidden = jax.nn.silu(jnp.einsum("gmd,gdf->gmf", tiled, _tile_weights(gate, tiles)))
  hidden = hidden * jnp.einsum("gmd,gdf->gmf", tiled, _tile_weights(up, tiles))
  return _from_tiles(jnp.einsum("gmf,gfd->gmd", hidden, _tile_weights(down, tiles)), tiles)


GROUPED_MATMULS = {"ragged": _ragged_dot, "blocked": _blocked_matmul, "pallas": _pallas_gmm}
