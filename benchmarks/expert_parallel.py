"""Expert-parallel MoE layer benchmark: fwd+bwd step time per dispatch strategy and mesh, as a table.

  python benchmarks/expert_parallel.py                         # 8 fake CPU devices when run on CPU
  python benchmarks/expert_parallel.py --tokens 8192 --iters 10 --meshes "expert=8;data=2,expert=4"

Letters: T tokens, D model, F expert hidden, E experts, K experts per token; per device N = T·K / devices pairs,
n expert-axis size. Columns: mesh, strategy, capacity factor, ms (median fwd+bwd of sum(out²)), dropped pairs,
MB moved: bytes that leave a device over one step, summed over devices, counted from shapes: 4 exchanges
(dispatch and return, forward and backward) of D-wide rows; all_to_all ships every padded slot
((n - 1) · slot rows per device per exchange), ragged_all_to_all only the pairs routed off-device.
The reference row is `routed_experts(impl="auto")` on one device. XLA:CPU cannot run ragged_all_to_all,
so on CPU those rows show only the bytes.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # only affects CPU

import argparse  # noqa: E402
import math  # noqa: E402

from _timing import time_ms  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kimi_jax import backend  # noqa: E402
from kimi_jax.expert_parallel import expert_parallel_moe  # noqa: E402
from kimi_jax.layers.experts import routed_experts  # noqa: E402


def _step(moe):
  """moe(x, weights, gate, up, down) -> (out [T, D], dropped) ⇒ jit'd fwd+bwd returning (grads, dropped)."""

  def loss(x, weights, gate, up, down):
    out, dropped = moe(x, weights, gate, up, down)
    return jnp.sum(jnp.square(out.astype(jnp.float32))), dropped

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


def _mesh(spec: str) -> jax.sharding.Mesh:
  names, sizes = zip(*(item.split("=") for item in spec.split(",")))
  return jax.make_mesh(tuple(map(int, sizes)), names)


def _bytes_moved(idx: np.ndarray, mesh, strategy: str, capacity_factor, num_experts: int, row_bytes: int) -> int:
  """idx: [T, K] -> bytes leaving devices over one fwd+bwd step (4 exchanges of rows of `row_bytes`)."""
  n = mesh.shape["expert"]
  shards = idx.reshape(mesh.size, -1)  # [token shard, N]; shards run over the mesh axes in order
  if strategy == "all_to_all":
    pairs = shards.shape[1]
    slot = pairs if capacity_factor is None else min(pairs, math.ceil(capacity_factor * pairs / n))
    rows = mesh.size * (n - 1) * slot  # every slot is shipped, full or not
  else:
    later = math.prod(list(mesh.shape.values())[list(mesh.axis_names).index("expert") + 1 :])
    source = np.arange(mesh.size)[:, None] // later % n  # each shard's position on the expert axis
    rows = int((shards // (num_experts // n) != source).sum())  # pairs routed off-device (dropless: a bound)
  return 4 * rows * row_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--expert_hidden", type=int, default=64)
  parser.add_argument("--experts", type=int, default=32)
  parser.add_argument("--top_k", type=int, default=4)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument(
    "--meshes",
    default=None,
    help="';'-separated mesh specs, each using every device "
    "(default: expert=8;data=2,expert=4;data=4,expert=2 on 8 devices, else expert=<devices>)",
  )
  parser.add_argument("--iters", type=int, default=5)
  args = parser.parse_args()

  t, d, f, e, k = args.tokens, args.hidden, args.expert_hidden, args.experts, args.top_k
  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  idx_np = np.argsort(rng.uniform(size=(t, e)), axis=1)[:, :k].astype(np.int32)  # k distinct experts per token
  idx = jnp.asarray(idx_np)
  x = jnp.asarray(rng.normal(size=(t, d)), dtype)
  weights = jnp.asarray(rng.uniform(size=(t, k)) / k, jnp.float32)
  gate, up = (jnp.asarray(rng.normal(size=(e, d, f)) / math.sqrt(d), dtype) for _ in range(2))
  down = jnp.asarray(rng.normal(size=(e, f, d)) / math.sqrt(f), dtype)
  params = (x, weights, gate, up, down)
  print(f"backend {jax.default_backend()}, {jax.device_count()} devices; T={t} D={d} F={f} E={e} K={k} {dtype.name}")

  reference = _step(lambda x, w, g, u, dn: routed_experts(x, idx, w, g, u, dn, impl="auto"))
  rows = [("1 device", "routed_experts(auto)", "-", time_ms(reference, params, args.iters), 0, 0.0)]
  meshes = args.meshes or (
    "expert=8;data=2,expert=4;data=4,expert=2" if jax.device_count() == 8 else f"expert={jax.device_count()}"
  )
  for spec in meshes.split(";"):
    mesh = _mesh(spec)
    for strategy in ("all_to_all", "ragged_all_to_all"):
      for factor in (None, args.capacity_factor):
        moved = _bytes_moved(idx_np, mesh, strategy, factor, e, d * dtype.itemsize) / 1e6
        label = "dropless" if factor is None else f"{factor:g}"
        if strategy == "ragged_all_to_all" and backend.platform() == "cpu":  # XLA:CPU has no ragged all-to-all
          rows.append((spec, strategy, label, None, None, moved))
          continue
        step = _step(
          lambda x, w, g, u, dn, mesh=mesh, strategy=strategy, factor=factor: expert_parallel_moe(
            x, idx, w, g, u, dn, mesh=mesh, strategy=strategy, capacity_factor=factor
          )
        )
        rows.append((spec, strategy, label, time_ms(step, params, args.iters), int(step(*params)[1]), moved))

  header = ("mesh", "strategy", "capacity", "ms fwd+bwd", "dropped", "MB moved")
  table = [header] + [
    (m, s, c, "n/a" if ms is None else f"{ms:.1f}", "-" if dr is None else str(dr), f"{mb:.1f}")
    for m, s, c, ms, dr, mb in rows
  ]
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  for row in table:
    print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
  main()
