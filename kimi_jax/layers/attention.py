"""Attention core for MLA: softmax(q·kᵀ·scale) v with causal + segment masking and per-head max logits.

Letters: B batch, S query length, T key length, H heads, Dn / Dr / Dv nope / rope / value dims.

The rope half of the key is one vector shared by all heads (MLA), so the logits are computed as
q_nope·k_nope + q_rope·k_rope without broadcasting k_rope over heads. The per-head maximum of the scaled
logits over unmasked pairs is what MuonClip's qk-clip consumes; it carries no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(segment_ids: jax.Array, *, causal: bool = True) -> jax.Array:
  """segment_ids: [B, S] (0 = padding) -> allowed pairs [B, S, S] bool: same segment, key ≤ query."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  if causal:
    s = segment_ids.shape[1]
    same &= jnp.tril(jnp.ones((s, s), bool))[None]
  return same


def mla_attention(q_nope: jax.Array, q_rope: jax.Array, k_nope: jax.Array, k_rope: jax.Array, v: jax.Array,
                  mask: jax.Array, query_valid: jax.Array, *, scale: float) -> tuple[jax.Array, jax.Array]:
  """Plain-XLA MLA attention.

  q_nope: [B, S, H, Dn], q_rope: [B, S, H, Dr], k_nope: [B, T, H, Dn], k_rope: [B, T, Dr] (shared by heads),
  v: [B, T, H, Dv], mask: [B, S, T] bool, query_valid: [B, S] bool (False for padding rows, which are left
  out of the max logits). Returns out [B, S, H, Dv] in v's dtype and max_logits [H] float32.
  """
  f32 = jnp.float32
  logits = jnp.einsum("bshd,bthd->bhst", q_nope, k_nope, preferred_element_type=f32)
  logits += jnp.einsum("bshr,btr->bhst", q_rope, k_rope, preferred_element_type=f32)
  logits *= scale
  mask = mask[:, None]  # [B, 1, S, T]
  counted = mask & query_valid[:, None, :, None]
  max_logits = jax.lax.stop_gradient(jnp.max(jnp.where(counted, logits, -jnp.inf), axis=(0, 2, 3)))
  # A finite fill keeps fully masked rows (padding) free of NaN; they are never read.
  probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(f32).min), axis=-1)
  out = jnp.einsum("bhst,bthd->bshd", probs.astype(v.dtype), v)
  return out, max_logits
