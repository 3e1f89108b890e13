"""Plain XLA decode attention over the MLA latent cache (the reference).

Dimensions: B batch, H heads, C latent rank (K2: 512), R rope dim (K2: 64),
T cache length (allocated); lengths[b] <= T valid positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mla_decode_reference(q_latent, q_rope, cache_latent, cache_rope, lengths, softmax_scale):
  """MQA with one (C+R)-dim key and the C-dim latent as value, in f32.

  q_latent: [B, H, C]; q_rope: [B, H, R]; cache_latent: [B, T, C]; cache_rope: [B, T, R];
  lengths: [B] int32. Returns [B, H, C] in q_latent's dtype (zeros where lengths == 0).
  """
  f32 = lambda x: x.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  logits = jnp.einsum("bhc,btc->bht", f32(q_latent), f32(cache_latent), precision=hi) + jnp.einsum(
    "bhr,btr->bht", f32(q_rope), f32(cache_rope), precision=hi
  )
  logits = logits * softmax_scale
  valid = jnp.arange(cache_latent.shape[1])[None, None, :] < lengths[:, None, None]
  probs = jax.nn.softmax(jnp.where(valid, logits, -jnp.inf), axis=-1)
  out = jnp.einsum("bht,btc->bhc", probs, f32(cache_latent), precision=hi)
  out = jnp.where((lengths > 0)[:, None, None], out, 0.0)
  return out.astype(q_latent.dtype)
