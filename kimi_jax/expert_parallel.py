"""Expert parallelism: routed experts with `jax.shard_map` over the mesh's expert axis.

Letters: the package's (kimi_jax/__init__.py): N tokens, D model, E experts, K experts per token, Fe expert hidden.
Here also, per device (primed): N' = N / token shards tokens, P' = N'·K (token, expert) pairs, A devices on the
expert axis, E' = E / A local experts, Fe' = Fe / tensor-axis size, R receive-buffer rows.

Each device holds N' tokens and E' experts. It sorts its P' pairs by expert, sends each expert's run to the
device owning that expert, runs the grouped matmul over its local experts on what it received (rows grouped
by local expert), sends the results back, and combines each token's K outputs with the routing weights in
float32: the math of `kimi_jax.layers.experts.routed_experts`, which is the reference.

Exchange: one slice per global expert. Source s sends expert g's kept pairs to device g // E', which writes
them where the grouped matmul wants them: after the rows of lower local experts and of lower sources. Every
device all-gathers the [A, E] pair counts first, so senders and receivers agree on all offsets.
  ragged_all_to_all  `jax.lax.ragged_all_to_all`: exact bytes, R = A·P' rows (the worst case) when dropless,
                     which at K2 scale is too much memory: pass a capacity_factor there. TPU/GPU; XLA:CPU
                     cannot run it.
  all_to_all         the same exchange over `jax.lax.all_to_all` with one fixed slot of P' rows per (source,
                     destination) pair when dropless: A× the bytes, runs everywhere.
  auto               ragged_all_to_all on TPU/GPU, all_to_all on CPU (`kimi_jax.backend`, for the compile target).

Capacity (optional): `capacity_factor` c bounds the receive buffer to R ≈ c·P' rows, P' being what a device
receives under perfectly balanced routing; for all_to_all each (source, destination) slot holds ceil(c·P'/A).
When a buffer would overflow, each (source, expert) keeps at most λ pairs, λ being the largest level that
fits, and drops the rest, latest tokens first. Dropped pairs contribute zero, and the count of dropped pairs
over the whole mesh is returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kimi_jax import backend
from kimi_jax.layers.experts import combine

# matmul(lhs [rows, in], rhs [groups, in, out], group_sizes [groups] int32) -> [rows, out]: rows grouped by group;
# rows past sum(group_sizes) are zeros here, so any value the matmul gives them is fine.
GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def expert_parallel_moe(
  x: jax.Array,
  idx: jax.Array,
  weights: jax.Array,
  gate: jax.Array,
  up: jax.Array,
  down: jax.Array,
  *,
  mesh: Mesh,
  expert_axis: str = "expert",
  token_axes: Sequence[str] | None = None,
  tensor_axis: str | None = None,
  strategy: str = "auto",
  capacity_factor: float | None = None,
  matmul: GroupedMatmul = jax.lax.ragged_dot,
  check_vma: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Routed experts, experts sharded over `expert_axis`; call it inside or outside jit.

  Args:
    x: [N, D] tokens; idx: [N, K] int expert ids; weights: [N, K] f32 routing weights.
    gate, up: [E, D, Fe]; down: [E, Fe, D] expert weights (any sharding: they are resharded to the specs
      below, so FSDP-sharded D is gathered on use).
    mesh: the device mesh (`jax.sharding.Mesh`, Auto or Explicit axes).
    expert_axis: mesh axis sharding E; its size A must divide E.
    token_axes: mesh axes sharding N, in order; must include expert_axis. Default: every mesh axis but
      tensor_axis, in mesh order. Their product must divide N.
    tensor_axis: optional mesh axis sharding F (tokens are replicated over it; outputs are summed over it).
    strategy: "ragged_all_to_all", "all_to_all" or "auto" (`backend.resolve("expert_parallel", ...)`: see the
      module docstring).
    capacity_factor: None for dropless; else c > 0 bounding the receive buffer (module docstring).
    matmul: the grouped matmul, e.g. `jax.lax.ragged_dot` or
      `functools.partial(pallas_kernels.gmm, impl="tpu")`. It only sees this device's E' experts and their
      group sizes, so no group offset is needed.
    check_vma: `jax.shard_map`'s check of which values vary over which mesh axes. A Pallas matmul whose
      outputs carry no such annotation (pallas_kernels.gmm today) needs False; results are the same.

  Returns:
    (out [N, D] in x's dtype, sharded like x over token_axes; dropped: int32 scalar, pairs dropped over
    the whole mesh, 0 when dropless).
  """
  strategy = backend.resolve("expert_parallel", strategy)
  token_axes = _check(x, idx, gate, mesh, expert_axis, token_axes, tensor_axis, capacity_factor)
  n = mesh.shape[expert_axis]
  pairs = idx.shape[0] // math.prod(mesh.shape[a] for a in token_axes) * idx.shape[1]
  if strategy == "all_to_all":
    slot = pairs if capacity_factor is None else min(pairs, math.ceil(capacity_factor * pairs / n))
    rows, exchange = n * slot, functools.partial(_padded_ragged_all_to_all, slot=slot)
  else:
    rows = n * pairs if capacity_factor is None else min(n * pairs, math.ceil(capacity_factor * pairs))
    exchange = jax.lax.ragged_all_to_all
  # Capacity applies per (source, destination) slot for all_to_all and per receive buffer for ragged.
  capacity = None if capacity_factor is None else (slot if strategy == "all_to_all" else rows)
  body = functools.partial(
    _moe_shard,
    axis=expert_axis,
    n=n,
    rows=rows,
    capacity=capacity,
    per_source=strategy == "all_to_all",
    exchange=exchange,
    matmul=matmul,
    token_axes=token_axes,
    tensor_axis=tensor_axis,
  )
  tokens = P(token_axes, None)
  specs = (
    tokens,
    tokens,
    tokens,
    P(expert_axis, None, tensor_axis),
    P(expert_axis, None, tensor_axis),
    P(expert_axis, tensor_axis, None),
  )
  args = [_as_spec(a, mesh, s) for a, s in zip((x, idx, weights, gate, up, down), specs)]
  return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(tokens, P()), check_vma=check_vma)(*args)


def _moe_shard(
  x, idx, weights, gate, up, down, *, axis, n, rows, capacity, per_source, exchange, matmul, token_axes, tensor_axis
):
  """One device. x: [N', D]; idx, weights: [N', K]; gate, up: [E', D, Fe']; down: [E', Fe', D] -> ([N', D], [])."""
  t, k = idx.shape
  local = gate.shape[0]
  me = jax.lax.axis_index(axis)
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)  # [P'] pair ids sorted by expert
  counts = jnp.bincount(flat, length=n * local).astype(jnp.int32)  # [E]
  all_counts = jax.lax.all_gather(counts, axis)  # [A, E]: pairs from each source to each expert
  kept = all_counts if capacity is None else _kept_counts(all_counts, n, capacity, per_source)
  # Offsets of (source, expert) runs: in the source's sorted pairs, and in the owner's receive buffer
  # (grouped by local expert, then by source).
  src_offsets = _exclusive_cumsum(all_counts, axis=1)  # [A, E]
  totals = kept.sum(0).reshape(n, local)  # [A, E']: rows each device gets per local expert
  dst_offsets = _exclusive_cumsum(totals, axis=1).reshape(1, -1) + _exclusive_cumsum(kept, axis=0)  # [A, E]
  mine = lambda a: jax.lax.dynamic_slice_in_dim(a, me * local, local, axis=1).reshape(-1)  # [A, E] -> [A·E']
  xs = x[order // k]  # [P', D]
  recv = exchange(
    xs, jnp.zeros((rows, x.shape[1]), x.dtype), src_offsets[me], kept[me], dst_offsets[me], mine(kept), axis_name=axis
  )  # [R, D] grouped by local expert
  group_sizes = jax.lax.dynamic_index_in_dim(totals, me, keepdims=False)  # [E']
  hidden = jax.nn.silu(matmul(recv, gate, group_sizes)) * matmul(recv, up, group_sizes)
  ys = matmul(hidden, down, group_sizes)  # [R, D]
  back = exchange(
    ys, jnp.zeros_like(xs), mine(dst_offsets), mine(kept), mine(src_offsets), kept[me], axis_name=axis
  )  # [P', D] sorted like xs; dropped pairs stay zero
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  out = combine(back[inverse].reshape(t, k, -1).astype(jnp.float32), weights)
  if tensor_axis is not None:
    out = jax.lax.psum(out, tensor_axis)
  dropped = jax.lax.psum(jnp.sum(counts - kept[me]), tuple(token_axes))
  return out.astype(x.dtype), dropped


def _kept_counts(counts: jax.Array, n: int, capacity: int, per_source: bool) -> jax.Array:
  """counts: [A, E] pairs per (source, expert) -> [A, E] pairs kept, each block's sum within `capacity`.

  A block is one (source, destination) slot when per_source, else everything one destination receives.
  Within a block every cell keeps min(count, level), the level being the largest that fits.
  """
  c = counts.reshape(n, n, -1)  # [source, destination, local expert]
  if per_source:
    level = _water_level(c, capacity)[..., None]  # [n, n, 1]
  else:
    level = _water_level(c.transpose(1, 0, 2).reshape(n, -1), capacity)[None, :, None]  # [1, n, 1]
  return jnp.minimum(c, level).reshape(n, -1)


def _water_level(cells: jax.Array, capacity: int) -> jax.Array:
  """cells: [..., m] int32 -> [...]: the largest level ≤ capacity with sum(min(cells, level)) ≤ capacity."""

  def bisect(_, bounds):
    lo, hi = bounds  # lo always fits; the answer lies in [lo, hi]
    mid = (lo + hi + 1) // 2
    fits = jnp.minimum(cells, mid[..., None]).sum(-1) <= capacity
    return jnp.where(fits, mid, lo), jnp.where(fits, hi, mid - 1)

  init = (jnp.zeros_like(cells[..., 0]), jnp.full_like(cells[..., 0], capacity))  # *_like keeps the vma
  return jax.lax.fori_loop(0, capacity.bit_length(), bisect, init)[0]


def _padded_ragged_all_to_all(
  operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name, slot
):
  """`jax.lax.ragged_all_to_all` over a padded `jax.lax.all_to_all` (for disjoint slices).

  operand: [M, ...]; output: [R, ...]; the four offset/size arrays: [n·s], s slices per peer. The slices
  sent to one peer must total at most `slot` rows: each peer pair exchanges one [slot, ...] block.
  """
  n = jax.lax.axis_size(axis_name)
  send_rows = _slot_rows(input_offsets.reshape(n, -1), send_sizes.reshape(n, -1), slot, operand.shape[0])
  blocks = operand.at[send_rows].get(mode="fill", fill_value=0)  # [n, slot, ...] one block per peer
  blocks = jax.lax.all_to_all(blocks, axis_name, 0, 0, tiled=True)  # now one block per source
  offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
  recv_rows = _slot_rows(offsets.reshape(n, -1), recv_sizes.reshape(n, -1), slot, output.shape[0])
  return output.at[recv_rows].set(blocks, mode="drop")


def _slot_rows(offsets: jax.Array, sizes: jax.Array, slot: int, invalid: int) -> jax.Array:
  """offsets, sizes: [n, s] slices per peer -> [n, slot]: the ragged-array row that entry q of peer p's
  block holds (the slices packed back to back), or `invalid` past them."""
  ends = jnp.cumsum(sizes, axis=1)
  q = jnp.arange(slot)
  which = jnp.minimum((q[None, :, None] >= ends[:, None, :]).sum(-1), sizes.shape[1] - 1)  # [n, slot]
  rows = jnp.take_along_axis(offsets - ends + sizes, which, axis=1) + q
  return jnp.where(q < ends[:, -1:], rows, invalid)


def _exclusive_cumsum(a: jax.Array, axis: int) -> jax.Array:
  return jnp.cumsum(a, axis=axis) - a


def _as_spec(a: jax.Array, mesh: Mesh, spec: P) -> jax.Array:
  """Explicit-axis meshes need arguments already sharded like shard_map's in_specs; Auto ones reshard."""
  if all(t == AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(a, NamedSharding(mesh, spec))
  return a


def _check(x, idx, gate, mesh, expert_axis, token_axes, tensor_axis, capacity_factor) -> tuple[str, ...]:
  """Validates the arguments; returns token_axes as a tuple."""
  names = tuple(mesh.axis_names)
  if token_axes is None:
    token_axes = tuple(a for a in names if a != tensor_axis)
  token_axes = tuple(token_axes)
  for what, axes in (
    ("expert_axis", (expert_axis,)),
    ("token_axes", token_axes),
    ("tensor_axis", () if tensor_axis is None else (tensor_axis,)),
  ):
    if missing := [a for a in axes if a not in names]:
      raise ValueError(f"{what}: mesh axes {missing} are not in the mesh {dict(mesh.shape)}")
  if expert_axis not in token_axes:
    raise ValueError(f"token_axes {token_axes} must include the expert axis {expert_axis!r}")
  if tensor_axis is not None and tensor_axis in token_axes:
    raise ValueError(f"tensor_axis {tensor_axis!r} cannot also shard tokens (token_axes {token_axes})")
  num_experts, n = gate.shape[0], mesh.shape[expert_axis]
  if num_experts % n:
    raise ValueError(f"{num_experts} experts are not divisible by the expert axis {expert_axis!r} of size {n}")
  shards = math.prod(mesh.shape[a] for a in token_axes)
  if x.shape[0] % shards:
    raise ValueError(f"{x.shape[0]} tokens are not divisible by the {shards} token shards over {token_axes}")
  if tensor_axis is not None and gate.shape[2] % mesh.shape[tensor_axis]:
    raise ValueError(
      f"expert hidden size {gate.shape[2]} is not divisible by the tensor axis "
      f"{tensor_axis!r} of size {mesh.shape[tensor_axis]}"
    )
  if idx.shape[0] != x.shape[0]:
    raise ValueError(f"idx has {idx.shape[0]} tokens but x has {x.shape[0]}")
  if capacity_factor is not None and not capacity_factor > 0:
    raise ValueError(f"capacity_factor must be positive or None (dropless), got {capacity_factor}")
  return token_axes
