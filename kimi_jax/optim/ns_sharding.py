"""Where Newton–Schulz runs on a mesh: whole matrices per device, the batch of matrices spread over the devices.

A stacked Muon leaf [..., I, J] (layers, experts, then the matrix) is usually sharded on its matrix axes too
(FSDP splits the model dim). Left to itself, XLA then partitions every Newton–Schulz step as partial Gram
products plus an all-reduce of the m×m Gram matrix, and repeats the m³ products on every device of the group.
`spread_layout` moves the mesh axes off the matrix axes onto stack axes instead (padding a stack axis with zero
matrices when that is cheap), so that each device orthogonalises only its own whole matrices: one all-to-all
in, one out, no per-step collectives. Mesh axes that shard nothing (data-parallel replicas) are used the same way.
"""

from collections.abc import Mapping, Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

# A stack axis may be padded with zero matrices by at most this fraction of its size to take a mesh axis
# (K2's 60 MoE layers → 64 over fsdp=8: 6.7 %). Past it the mesh axis stays where it was.
MAX_PADDING = 0.125


def _names(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(names: Sequence[str]) -> Any:
  return None if not names else names[0] if len(names) == 1 else tuple(names)


def spread_layout(
  shape: Sequence[int], spec: PartitionSpec, axis_sizes: Mapping[str, int], max_padding: float = MAX_PADDING
) -> tuple[tuple[int, ...], PartitionSpec]:
  """The padded shape and the spec to run Newton–Schulz on a [..., I, J] array laid out as `spec`.

  Mesh axes leave the two matrix axes, and mesh axes of size > 1 that `spec` does not use join in, each going
  to the stack axis it divides after the least padding (within `max_padding`); an axis that fits nowhere stays
  on its matrix axis (or stays unused). Batch axes keep their own mesh axes.
  """
  if len(shape) < 2:
    raise ValueError(f"spread_layout needs [..., I, J], got shape {tuple(shape)}")
  entries = [_names(e) for e in (*spec, *([None] * (len(shape) - len(spec))))]
  nb = len(shape) - 2
  used = {a for e in entries for a in e}
  candidates = [*entries[-2], *entries[-1], *(a for a in axis_sizes if a not in used and axis_sizes[a] > 1)]
  batch, sizes, stay = [list(e) for e in entries[:nb]], list(shape[:nb]), set()
  for axis in candidates:
    best = None
    for i in range(nb):
      shards = math.prod(axis_sizes[a] for a in batch[i]) * axis_sizes[axis]
      padded = -(-sizes[i] // shards) * shards
      if padded <= shape[i] * (1 + max_padding) and (best is None or padded / sizes[i] < best[1] / sizes[best[0]]):
        best = (i, padded)
    if best is None:
      stay.add(axis)
    else:
      batch[best[0]].append(axis)
      sizes[best[0]] = best[1]
  matrix = [_entry([a for a in e if a in stay]) for e in entries[-2:]]
  return (*sizes, *shape[-2:]), PartitionSpec(*(_entry(b) for b in batch), *matrix)


def moved_spec(spec: PartitionSpec, ndim: int, dims: tuple[int, int]) -> PartitionSpec:
  """`spec` of an ndim-axis leaf, permuted like `jnp.moveaxis(leaf, dims, (-2, -1))`."""
  entries = [*spec, *([None] * (ndim - len(spec)))]
  return PartitionSpec(*(e for i, e in enumerate(entries) if i not in dims), entries[dims[0]], entries[dims[1]])


def spread(x: jax.Array, sharding: NamedSharding, local_fn, global_fn, result_dtype: Any = None) -> jax.Array:
  """fn(x) for x [..., I, J] laid out as `sharding`, computed in the `spread_layout` layout, returned in x's.

  When that layout leaves both matrix axes whole, `local_fn` runs under shard_map on each device's own matrices
  (so it may be a Pallas kernel, which XLA cannot partition); otherwise `global_fn` runs on the global array
  and XLA partitions it. result_dtype: the dtype to move the result back in (e.g. bf16 when fn's float32 output
  holds bf16 values, halving the all-to-all); the result is then cast to fn's output dtype.
  """
  shape, spec = spread_layout(x.shape, sharding.spec, dict(sharding.mesh.shape))
  target = NamedSharding(sharding.mesh, spec)
  padded = jax.lax.with_sharding_constraint(jnp.pad(x, [(0, p - s) for p, s in zip(shape, x.shape)]), target)
  if spec[-2] is None and spec[-1] is None:
    y = jax.shard_map(local_fn, mesh=sharding.mesh, in_specs=spec, out_specs=spec, check_vma=False)(padded)
  else:
    y = global_fn(padded)
  out_dtype = y.dtype
  y = y[tuple(slice(0, s) for s in x.shape)].astype(result_dtype or out_dtype)
  return jax.lax.with_sharding_constraint(y, sharding).astype(out_dtype)


__all__ = ("MAX_PADDING", "moved_spec", "spread", "spread_layout")
