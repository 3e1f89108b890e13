"""Parameters with logical axis names, and the bias-free Linear every projection uses.

Kernels are stored [in, out] (x @ W); logical names ("embed", "heads", "experts", …) are recorded as
metadata and mapped to mesh axes by `kimi_jax.sharding`, so the model code never names a mesh axis.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp


def param(
  rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], *, std: float, dtype: jnp.dtype
) -> nnx.Param:
  """A normal(0, std) parameter annotated with logical axis `names` (one per dim)."""
  assert len(names) == len(shape), (shape, names)
  value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, sharding_names=names, eager_sharding=False)


def ones(shape: tuple[int, ...], names: tuple[str | None, ...], *, dtype: jnp.dtype) -> nnx.Param:
  return nnx.Param(jnp.ones(shape, dtype), sharding_names=names, eager_sharding=False)


class Linear(nnx.Module):
  """y = x @ kernel, computed in `dtype`. kernel: [in, out]."""

  def __init__(
    self,
    d_in: int,
    d_out: int,
    names: tuple[str | None, str | None],
    *,
    std: float,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    rngs: nnx.Rngs,
  ):
    self.kernel = param(rngs, (d_in, d_out), names, std=std, dtype=param_dtype)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., in] -> [..., out]."""
    return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
