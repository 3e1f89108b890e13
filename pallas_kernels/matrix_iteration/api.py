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

from pallas_kernels._common import check_float, resolve_impl, target_device_kind

# Default scoped-VMEM limit requested for the kernel, and the largest per-program footprint `vmem_bytes` may
# report for it to be used, on TPUs from v5e on. TPU v4 has 16 MiB of VMEM per core (libtpu refuses a 576 × 2048
# bf16 matrix there: "Used 18.13M of 16.00M vmem"), so `vmem_limit(...)` halves the budget for it.
VMEM_LIMIT_BYTES = 32 << 20
_SMALL_VMEM_KINDS = ("TPU v2", "TPU v3", "TPU v4")  # 16 MiB of VMEM per core


def vmem_limit(device_kind: str | None = None) -> int:
  """The VMEM budget for one kernel program on `device_kind` (default: the chip being compiled for)."""
  kind = target_device_kind() if device_kind is None else device_kind
  return 16 << 20 if kind.startswith(_SMALL_VMEM_KINDS) else VMEM_LIMIT_BYTES


def fits(m: int, n: int, dtype, device_kind: str | None = None) -> bool:
  """Whether the kernel can hold an m×n matrix of `dtype` on `device_kind` (default: the chip compiled for)."""
  return vmem_bytes(m, n, dtype) <= vmem_limit(device_kind)


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
    vmem_limit_bytes: scoped VMEM requested for the kernel (capped at `vmem_limit()` for the chip compiled for);
      see `vmem_bytes` for what one matrix needs. A matrix over the chip's budget (`fits`) runs the XLA loop
      even with impl "tpu" (the kernel would not compile there), unless interpret.

  Returns:
    [B, m, n] in x's dtype.
  """
  if x.ndim != 3:
    raise ValueError(f"x must be [B, m, n], got shape {x.shape}")
  check_float(x=x)
  impl = resolve_impl(impl)
  if impl == "gpu":
    impl = "xla"  # no GPU kernel: a 256×512 bf16 matrix alone exceeds an H100 SM's 228 KB of shared memory
  if impl == "tpu" and not interpret:
    vmem_limit_bytes = min(vmem_limit_bytes, vmem_limit())
    if not fits(*x.shape[1:], x.dtype):
      impl = "xla"
  if impl == "xla":
    for _ in range(num_steps):
      x = step(x)
    return x
  from pallas_kernels.matrix_iteration import tpu

  return tpu.matrix_iteration(
    x, step, num_steps, flops_per_step=flops_per_step, interpret=interpret, vmem_limit_bytes=vmem_limit_bytes
  )
