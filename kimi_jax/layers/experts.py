"""Routed-expert compute behind one function, `routed_experts(..., impl=)`.

Letters: T tokens, D model, E experts, K experts per token, F expert hidden, N = T·K (token, expert) pairs,
G tiles (blocked impl), M tile rows.

Every impl computes, for each token t, sum_k w[t,k] · down_e(silu(gate_e(x_t)) * up_e(x_t)) with
e = idx[t,k], summed in float32 like transformers, and returns [T, D] in x's dtype.
  dense    every expert on every token, then a weighted combine: the reference (E/K × the FLOPs).
  ragged   pairs sorted by expert and `jax.lax.ragged_dot`: exact FLOPs on TPU/GPU; XLA:CPU expands it to
           a dense masked product (E × the FLOPs of the pairs).
  blocked  pairs sorted by expert, each expert's run padded to M-row tiles, one batched matmul over tiles
           with each tile's expert weights gathered: exact and dropless at ≤ N + E·M rows of work. The fast
           path on CPU.
  pallas   the grouped-matmul Pallas kernel (pallas_kernels.gmm) on sorted pairs.
  auto     see `kernels.resolve_moe_impl`: blocked on CPU, pallas on TPU, ragged on GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kimi_jax.layers.kernels import pallas_options, resolve_moe_impl

BLOCK_ROWS = 128  # M for the blocked impl: large enough for efficient matmuls, small enough to bound padding.


def routed_experts(x: jax.Array, idx: jax.Array, weights: jax.Array, gate: jax.Array, up: jax.Array,
                   down: jax.Array, *, impl: str) -> jax.Array:
  """x: [T, D]; idx: [T, K] int; weights: [T, K] f32; gate, up: [E, D, F]; down: [E, F, D] -> [T, D]."""
  impl = resolve_moe_impl(impl)
  if impl == "dense":
    return _dense(x, idx, weights, gate, up, down)
  if impl not in ("ragged", "blocked", "pallas"):
    raise ValueError(f"unknown moe impl {impl!r}")
  t, k = idx.shape
  num_experts = gate.shape[0]
  flat_expert = idx.reshape(-1)
  order = jnp.argsort(flat_expert, stable=True)  # [N] pair ids sorted by expert
  token = order // k
  group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
  xs = x[token]  # [N, D]
  if impl == "blocked":
    ys = _blocked_ffn(xs, group_sizes, gate, up, down)
  else:
    matmul = _ragged_dot if impl == "ragged" else _pallas_gmm
    hidden = jax.nn.silu(matmul(xs, gate, group_sizes)) * matmul(xs, up, group_sizes)
    ys = matmul(hidden, down, group_sizes)
  # Un-sort with the inverse permutation, then combine each token's K outputs in float32.
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  ys = ys[inverse].reshape(t, k, -1).astype(jnp.float32)
  return jnp.einsum("tkd,tk->td", ys, weights).astype(x.dtype)


def _dense(x, idx, weights, gate, up, down):
  hidden = jax.nn.silu(jnp.einsum("td,edf->tef", x, gate)) * jnp.einsum("td,edf->tef", x, up)
  ys = jnp.einsum("tef,efd->ted", hidden, down).astype(jnp.float32)
  t = x.shape[0]
  combine = jnp.zeros((t, gate.shape[0]), jnp.float32).at[jnp.arange(t)[:, None], idx].add(weights)
  return jnp.einsum("ted,te->td", ys, combine).astype(x.dtype)


def _ragged_dot(xs, w, group_sizes):
  return jax.lax.ragged_dot(xs, w, group_sizes)


def _pallas_gmm(xs, w, group_sizes):
  import pallas_kernels  # standalone package; imported only when this impl is chosen

  return pallas_kernels.gmm(xs, w, group_sizes, **pallas_options())


def _blocked_ffn(xs: jax.Array, group_sizes: jax.Array, gate: jax.Array, up: jax.Array,
                 down: jax.Array) -> jax.Array:
  """xs: [N, D] sorted by expert with `group_sizes` [E] -> [N, D], the expert FFN of each row."""
  n, d = xs.shape
  num_experts = gate.shape[0]
  m = min(BLOCK_ROWS, max(8, n))
  num_tiles = -(-n // m) + num_experts  # static bound on sum_e ceil(size_e / M)
  padded_sizes = -(-group_sizes // m) * m
  padded_start = jnp.cumsum(padded_sizes) - padded_sizes
  start = jnp.cumsum(group_sizes) - group_sizes
  expert_of_row = jnp.repeat(jnp.arange(num_experts), group_sizes, total_repeat_length=n)
  row = padded_start[expert_of_row] + jnp.arange(n) - start[expert_of_row]  # [N] row in the tiled layout
  tiled = jnp.zeros((num_tiles * m, d), xs.dtype).at[row].set(xs).reshape(num_tiles, m, d)
  # Expert of each tile; tiles past the last group hold zeros and reuse the last expert's weights.
  tile_expert = jnp.searchsorted(jnp.cumsum(padded_sizes), jnp.arange(num_tiles) * m, side="right")
  tile_expert = jnp.minimum(tile_expert, num_experts - 1)
  hidden = jax.nn.silu(jnp.einsum("gmd,gdf->gmf", tiled, gate[tile_expert]))
  hidden = hidden * jnp.einsum("gmd,gdf->gmf", tiled, up[tile_expert])
  out = jnp.einsum("gmf,gfd->gmd", hidden, down[tile_expert])
  return out.reshape(num_tiles * m, d)[row]
