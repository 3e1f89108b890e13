"""XLA references for the grouped matmul: jax.lax.ragged_dot and its transpose.

Dimensions: M rows, K contraction, N output columns, G local groups, GT all groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.metadata import local_group_bounds


def _local_view(lhs, group_sizes, group_offset, num_local):
  """Zeroes rows of non-local groups and folds them into the first/last local group.

  ragged_dot has no group offset; a zero row gives a zero output row whichever rhs it
  meets, so rows before the local range join group 0 and rows after join group G-1.
  Returns (masked lhs [M, K], sizes [G] summing to M).
  """
  m = lhs.shape[0]
  gs, ge = local_group_bounds(group_sizes, group_offset, num_local, m)
  s, e = gs[0], ge[-1]
  rows = jnp.arange(m, dtype=jnp.int32)
  lhs = jnp.where(((rows >= s) & (rows < e))[:, None], lhs, jnp.zeros((), lhs.dtype))
  sizes = (ge - gs).at[0].add(s).at[-1].add(m - e)
  return lhs, sizes


def gmm_reference(
  lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, preferred_element_type=None, group_offset=None
) -> jax.Array:
  """out[M, N] = lhs[rows of g] @ rhs[g] per local group; other rows are zero.

  lhs: [M, K], rhs: [G, K, N], group_sizes: [GT] int32, group_offset: scalar int32
  (first local group; None means 0 with G == GT).
  """
  num_local = rhs.shape[0]
  if group_offset is None and num_local == group_sizes.shape[0]:
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type)
  lhs, sizes = _local_view(lhs, group_sizes, 0 if group_offset is None else group_offset, num_local)
  return jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=preferred_element_type)


def tgmm_reference(
  lhs: jax.Array,
  dout: jax.Array,
  group_sizes: jax.Array,
  *,
  num_groups: int,
  preferred_element_type=None,
  group_offset=None,
) -> jax.Array:
  """out[G, K, N] = lhs[rows of g]^T @ dout[rows of g] per local group (zero if empty).

  lhs: [M, K], dout: [M, N], group_sizes: [GT] int32. This is the transpose of
  gmm_reference in its rhs argument, so it is computed as exactly that.
  """
  k, n = lhs.shape[1], dout.shape[1]
  out_dtype = preferred_element_type or jnp.result_type(lhs, dout)
  # f32 throughout, like the kernels' accumulators.
  rhs_aval = jax.ShapeDtypeStruct((num_groups, k, n), jnp.float32)
  f = lambda r: gmm_reference(
    lhs.astype(jnp.float32), r, group_sizes, preferred_element_type=jnp.float32, group_offset=group_offset
  )
  (out,) = jax.linear_transpose(f, rhs_aval)(dout.astype(jnp.float32))
  return out.astype(out_dtype)
