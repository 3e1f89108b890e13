"""Flash attention (causal, packed segments, Dqk != Dv, per-head max logits)."""

from pallas_kernels.flash_attention.api import flash_attention
from pallas_kernels.flash_attention.reference import attention_reference

__all__ = ["flash_attention", "attention_reference"]
