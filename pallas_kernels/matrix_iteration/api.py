"""matrix_iteration: y ← step(y), num_steps times, for every matrix of y [B, m, n], fused into one kernel.

Newton–Schulz (Muon) is five such steps of small matmuls. Run by XLA, each step reads and writes its iterate
and Gram matrices through HBM, so for the m ≤ 512 matrices of small models the optimizer is bound by memory
traffic (~170 bytes per parameter per update on TPU v5p, by XLA's cost analysis of the proxy model's update)
rather than by its FLOPs. Here one kernel program holds one matrix in VMEM for all steps: one read and one
write per matrix.

Dimensions: B matrices, m × n each (any sizes; the whole matrix is one block).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels._common import check_float, resolve_impl

# Default scoped-VMEM limit requested for the kernel, and the largest per-program footprint `vmem_bytes` may
# report for it to be used. Every TPU from v4 on has at least 32 MiB of VMEM per core.
VMEM_LIMIT_BYTES = 32 << 20


def vmem_bytes(m: int, n: int, dtype) -> int:
  """Upper estimate of the VMEM one program needs for an m×n matrix of `dtype` and a Newton–Schulz-like step:
  double-buffered input and output blocks, the iterate, float32 products of m×n and m×m."""
  item = jnp.dtype(dtype).itemsize
  return 4 * m * n * item + m * n * (item + 8) + m * m * (2 * item + 8)


def matrix_iteration(
  x: jax.Array,
  step: Callable[[jax.Array], jax.Array],
  num_steps: int,
  *,
  flops_per_step: int = 0,
  impl: str = "auto",
  interpret: bool = False,
  vmem_limit_bytes: int = VMEM_LIMIT_BYTES,
) -> jax.Array:
  """Applies `step` num_steps times to each matrix of x.

  Args:
    x: [B, m, n] float32 or bfloat16.
    step: [m, n] -> [m, n] in x's dtype, written with jnp ops that also work on [B, m, n] (e.g. "...ij" einsums):
      the kernel calls it on one matrix, the XLA path on the whole batch.
    num_steps: how many times to apply it.
    flops_per_step: FLOPs of one step on one matrix, for XLA's cost model of the kernel.
    impl: "auto" (tpu on TPU, xla elsewhere), "xla" (a loop of `step` over the batch) or "tpu" (Pallas Mosaic).
    interpret: run the TPU kernel in interpret mode (CPU testing).
    vmem_limit_bytes: scoped VMEM requested for the kernel; see `vmem_bytes` for what one matrix needs.

  Returns:
    [B, m, n] in x's dtype.
  """
  if x.ndim != 3:
    raise ValueError(f"x must be [B, m, n], got shape {x.shape}")
  check_float(x=x)
  impl = resolve_impl(impl)
  if impl == "gpu":
    impl = "xla"  # no GPU kernel: a 256×512 bf16 matrix alone exceeds an H100 SM's 228 KB of shared memory
  if impl == "xla":
    for _ in range(num_steps):
      x = step(x)
    return x
  from pallas_kernels.matrix_iteration import tpu

  return tpu.matrix_iteration(
    x, step, num_steps, flops_per_step=flops_per_step, interpret=interpret, vmem_limit_bytes=vmem_limit_bytes
  )
