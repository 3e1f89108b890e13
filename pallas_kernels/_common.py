"""Small helpers shared by the kernels: backend choice and integer arithmetic.

This package never imports kimi_jax; it depends on jax only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "tpu", "gpu")


def resolve_impl(impl: str, gpu: bool = True) -> str:
  """Maps "auto" to the kernel for the default backend: tpu, gpu, or xla (CPU).

  gpu: whether the op's GPU kernel is one `auto` may pick, i.e. it compiles for an H100 without register spills
  (tests/pallas/test_gpu_aot.py); if not, `auto` on GPU gives "xla". An explicit "gpu" always runs the kernel.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu"
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu" if gpu else "xla"
  return "xla"


def target_device_kind() -> str:
  """The device kind being compiled for: the current abstract mesh's device (an ahead-of-time target), else this
  host's first device (e.g. "TPU v4", "NVIDIA H100 80GB HBM3", "cpu")."""
  abstract = jax.sharding.get_abstract_mesh().abstract_device
  if abstract is not None:
    return abstract.device_kind
  return jax.devices()[0].device_kind


# What every kernel (TPU Mosaic, GPU Triton) and its XLA reference accept for float operands.
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def check_float(**operands: jax.Array) -> None:
  """Raises ValueError naming the operand unless all are float32 or all bfloat16 (one dtype, so that backends
  agree on precision: the kernels would otherwise promote differently from XLA)."""
  for name, x in operands.items():
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
      raise ValueError(f"{name} has dtype {jnp.dtype(x.dtype).name}; supported: float32, bfloat16")
  names = list(operands)
  first = operands[names[0]].dtype
  for name in names[1:]:
    if operands[name].dtype != first:
      raise ValueError(
        f"{name} is {jnp.dtype(operands[name].dtype).name} but {names[0]} is "
        f"{jnp.dtype(first).name}: cast them to one dtype"
      )


def check_int(name: str, x, ndim: int | None = None) -> None:
  """Raises ValueError naming the operand unless it is an integer array (of `ndim` axes if given)."""
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {jnp.asarray(x).dtype}")
  if ndim is not None and jnp.ndim(x) != ndim:
    raise ValueError(f"{name} must have {ndim} axes, got shape {jnp.shape(x)}")


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
