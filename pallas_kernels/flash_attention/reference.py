"""Plain XLA attention: the reference for the flash-attention kernels.

Dimensions: B batch, S sequence, H heads, Dqk query/key head dim, Dv value head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(seq_len: int, segment_ids, causal: bool, batch: int):
  """valid[B, Sq, Sk]: key k is visible to query q (causal and same segment)."""
  pos = jnp.arange(seq_len)
  valid = jnp.ones((batch, seq_len, seq_len), bool)
  if causal:
    valid &= pos[None, :, None] >= pos[None, None, :]
  if segment_ids is not None:
    valid &= segment_ids[:, :, None] == segment_ids[:, None, :]
  return valid


def attention_reference(q, k, v, *, segment_ids=None, causal=True, softmax_scale=None, return_max_logits=False):
  """Softmax attention in f32.

  q, k: [B, S, H, Dqk]; v: [B, S, H, Dv]; segment_ids: [B, S] int32 or None (0 = padding).
  Returns out [B, S, H, Dv] (dtype of q), and with return_max_logits also
  max_logits [H] f32: the largest scaled logit over unmasked pairs whose query is not
  padding (no gradient).
  """
  b, s, _, dqk = q.shape
  scale = dqk**-0.5 if softmax_scale is None else softmax_scale
  logits = (
    jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    * scale
  )
  valid = attention_mask(s, segment_ids, causal, b)[:, None]
  logits = jnp.where(valid, logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST).astype(q.dtype)
  if not return_max_logits:
    return out
  counted = valid if segment_ids is None else valid & (segment_ids != 0)[:, None, :, None]
  max_logits = jax.lax.stop_gradient(jnp.max(jnp.where(counted, logits, -jnp.inf), axis=(0, 2, 3)))
  return out, max_logits
