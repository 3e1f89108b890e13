"""How the model calls the standalone Pallas kernels (`pallas_kernels`), and what `auto` picks.

On TPU and GPU the kernels run natively. On CPU an explicit `*_impl="pallas"` runs the TPU kernel in Pallas
interpret mode: slow, but it executes the kernel body, which is what the model-level tests want.
`auto` uses a kernel only where it has been compiled for the platform (TPU, checked ahead of time); GPU keeps
the XLA paths until the Triton kernels have been measured on hardware.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax

_TARGET: list[str] = []


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
  """Resolve `auto` and the kernels for `platform` instead of this host's backend (ahead-of-time compiles)."""
  _TARGET.append(platform)
  try:
    yield
  finally:
    _TARGET.pop()


def platform() -> str:
  return _TARGET[-1] if _TARGET else jax.default_backend()


def pallas_options() -> dict:
  backend = platform()
  if backend in ("tpu", "gpu"):
    return {"impl": backend}
  return {"impl": "tpu", "interpret": True}


def resolve_moe_impl(impl: str) -> str:
  if impl != "auto":
    return impl
  return {"cpu": "blocked", "tpu": "pallas"}.get(platform(), "ragged")


def resolve_attention_impl(impl: str) -> str:
  if impl != "auto":
    return impl
  return "pallas" if platform() == "tpu" else "xla"
