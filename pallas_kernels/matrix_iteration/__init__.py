"""A fixed number of steps of an iteration on each matrix of a batch, with the matrix kept in VMEM throughout."""

from pallas_kernels.matrix_iteration.api import VMEM_LIMIT_BYTES, fits, matrix_iteration, vmem_bytes, vmem_limit

__all__ = ["VMEM_LIMIT_BYTES", "fits", "matrix_iteration", "vmem_bytes", "vmem_limit"]
