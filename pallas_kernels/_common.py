"""Small helpers shared by the kernels: backend choice and integer arithmetic.

This package never imports kimi_jax; it depends on jax only.
"""

from __future__ import annotations

import jax

IMPLS = ("auto", "xla", "tpu", "gpu")


def resolve_impl(impl: str) -> str:
  """Maps "auto" to the kernel for the default backend: tpu, gpu, or xla (CPU)."""
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu"
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu"
  return "xla"


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def round_up(a: int, b: int) -> int:
  return cdiv(a, b) * b


def pick_tile(dim: int, candidates: tuple[int, ...], full_max: int) -> int:
  """Largest candidate dividing `dim`; else the whole dim if small; else the smallest candidate.

  The last case makes the caller pad `dim` up to a multiple of the tile.
  """
  for c in candidates:
    if dim % c == 0:
      return c
  if dim <= full_max:
    return dim
  return min(candidates)
