"""Decode attention over the MLA latent cache."""

from pallas_kernels.mla_decode.api import mla_decode
from pallas_kernels.mla_decode.reference import mla_decode_reference

__all__ = ["mla_decode", "mla_decode_reference"]
