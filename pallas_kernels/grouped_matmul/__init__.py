"""Grouped matmul (MoE experts): gmm, tgmm and their XLA references."""

from pallas_kernels.grouped_matmul.api import gmm, tgmm
from pallas_kernels.grouped_matmul.reference import gmm_reference, tgmm_reference

__all__ = ["gmm", "tgmm", "gmm_reference", "tgmm_reference"]
