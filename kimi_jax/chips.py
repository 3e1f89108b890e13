"""Per-chip peak numbers from public spec sheets, keyed by a short chip name ("v5p", "h100", ...).

Used for MFU (`kimi_jax.train`), step-time and fit estimates (`kimi_jax.tools.aot`) and rooflines (benchmarks).
Imports nothing from kimi_jax.
"""

from __future__ import annotations

# bf16 dense peak FLOP/s per chip.
PEAK_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12, "a100": 312e12, "h100": 989e12, "h200": 989e12}
# HBM per chip, bytes, for the chips `kimi_jax.tools.aot` compiles for (H100 SXM: nominal 80 GiB, of which CUDA
# reports 79.1 GiB to programs).
HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30, "h100": 80 << 30}
# HBM bandwidth per chip, bytes/s (A100 80 GB SXM, H100 SXM).
HBM_BYTES_PER_S = {
  "v4": 1.2e12,
  "v5e": 8.19e11,
  "v5p": 2.765e12,
  "v6e": 1.64e12,
  "a100": 2.04e12,
  "h100": 3.35e12,
  "h200": 4.8e12,
}
# Lower-case substrings of `jax.Device.device_kind` -> chip name; the longest match wins.
_DEVICE_KINDS = {
  "tpu v4": "v4",
  "tpu v5 lite": "v5e",
  "tpu v5e": "v5e",
  "tpu v5p": "v5p",
  "tpu v5": "v5p",
  "tpu v6 lite": "v6e",
  "tpu v6e": "v6e",
  "a100": "a100",
  "h100": "h100",
  "h200": "h200",
}


def chip_name(device_kind: str) -> str | None:
  """The chip of a `jax.Device.device_kind` (e.g. "TPU v5p", "NVIDIA H100 80GB HBM3"); None if unknown (CPUs)."""
  kind = device_kind.lower()
  for name in sorted(_DEVICE_KINDS, key=len, reverse=True):
    if name in kind:
      return _DEVICE_KINDS[name]
  return None


def device_peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of a `jax.Device.device_kind`; None if unknown (CPUs)."""
  chip = chip_name(device_kind)
  return None if chip is None else PEAK_FLOPS[chip]
