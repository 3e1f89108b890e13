"""SwiGLU MLP: down(silu(gate(x)) * up(x)). Used by the dense layers and as the shared expert.

Letters (kimi_jax/__init__.py): D model, F hidden (intermediate_size in a dense layer; n_shared_experts · Fe
as the shared expert).
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from kimi_jax.layers.linear import Linear


class MLP(nnx.Module):
  def __init__(
    self, d_model: int, d_hidden: int, *, std: float, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs
  ):
    kw = dict(std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = Linear(d_model, d_hidden, ("embed", "mlp"), **kw)
    self.up = Linear(d_model, d_hidden, ("embed", "mlp"), **kw)
    self.down = Linear(d_hidden, d_model, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., D] -> [..., D]."""
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
