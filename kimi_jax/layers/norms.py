"""RMSNorm as in transformers' DeepseekV3: statistics in float32, cast back, then times the weight."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from kimi_jax.layers.linear import ones


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float, name: str, param_dtype: jnp.dtype):
    self.scale = ones((dim,), (name,), dtype=param_dtype)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., dim] -> same shape and dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return y.astype(x.dtype) * self.scale[...].astype(x.dtype)
