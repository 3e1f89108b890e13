"""matrix_iteration for TPU (Pallas / Mosaic): grid (B,), one whole [m, n] matrix per program."""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def matrix_iteration(x, step, num_steps, *, flops_per_step, interpret, vmem_limit_bytes):
  """x [B, m, n] -> [B, m, n]: `step` applied num_steps times to each matrix, in VMEM."""
  b, m, n = x.shape

  def kernel(x_ref, o_ref):
    y = x_ref[...]
    for _ in range(num_steps):  # unrolled: a handful of steps
      y = step(y)
    o_ref[...] = y.astype(o_ref.dtype)

  block = pl.BlockSpec((None, m, n), lambda i: (i, 0, 0))
  return pl.pallas_call(
    kernel,
    grid=(b,),
    in_specs=[block],
    out_specs=block,
    out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",), vmem_limit_bytes=vmem_limit_bytes),
    cost_estimate=pl.CostEstimate(
      flops=b * num_steps * flops_per_step, transcendentals=0, bytes_accessed=2 * x.size * x.dtype.itemsize
    ),
    interpret=interpret,
    name="matrix_iteration_tpu",
  )(x)
