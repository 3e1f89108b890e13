"""Attention cores for MLA: softmax(q·kᵀ·scale) v over the sequence (training, prefill) or over a cache (decode).

Letters: B batch, S query length, T key length (in decode: cache length), H heads, C latent rank,
Dn / Dr / Dv nope / rope / value dims.

`mla_attention` (training, prefill): causal + segment masking and per-head max logits. The rope half of the key is
one vector shared by all heads (MLA), so the logits are computed as q_nope·k_nope + q_rope·k_rope without
broadcasting k_rope over heads. The per-head maximum of the scaled logits over unmasked pairs is what MuonClip's
qk-clip consumes; it carries no gradient.

`latent_attention`, `expanded_attention` (decode): one query per row over the first lengths[b] cache entries, the
later (unwritten) ones masked; softmax in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kimi_jax import backend, sharding


def attention_mask(segment_ids: jax.Array, *, causal: bool = True) -> jax.Array:
  """segment_ids: [B, S] (0 = padding) -> allowed pairs [B, S, S] bool: same segment, key ≤ query."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  if causal:
    s = segment_ids.shape[1]
    same &= jnp.tril(jnp.ones((s, s), bool))[None]
  return same


def mla_attention(
  q_nope: jax.Array,
  q_rope: jax.Array,
  k_nope: jax.Array,
  k_rope: jax.Array,
  v: jax.Array,
  segment_ids: jax.Array,
  *,
  scale: float,
  impl: str = "xla",
) -> tuple[jax.Array, jax.Array]:
  """Causal MLA self-attention within segments.

  q_nope: [B, S, H, Dn], q_rope: [B, S, H, Dr], k_nope: [B, S, H, Dn], k_rope: [B, S, Dr] (shared by heads),
  v: [B, S, H, Dv], segment_ids: [B, S] (0 = padding). Returns out [B, S, H, Dv] in v's dtype and
  max_logits [H] float32 over allowed pairs whose query is not padding (both impls). "auto": see
  `kimi_jax.backend`.
  """
  if backend.resolve("attention", impl) == "pallas":
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], k_nope.shape[:3] + k_rope.shape[-1:])], -1)
    return _flash(q, k, v, segment_ids, scale)
  f32 = jnp.float32
  mask, query_valid = attention_mask(segment_ids), segment_ids != 0
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


def _flash(
  q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float
) -> tuple[jax.Array, jax.Array]:
  """The Pallas flash kernel; under a mesh, one call per (batch shard, head shard) via shard_map.

  Kernels cannot be partitioned by XLA, so each device runs it on its local [B/b, S, H/t, ·] block, and the
  per-head max logits are max-reduced over the batch shards.
  """
  import pallas_kernels  # standalone package; imported only when this impl is chosen

  def local(q, k, v, segment_ids):
    return pallas_kernels.flash_attention(
      q,
      k,
      v,
      segment_ids=segment_ids,
      causal=True,
      softmax_scale=scale,
      return_max_logits=True,
      **backend.pallas_options(),
    )

  mesh = sharding.active_mesh()
  if mesh is None:
    return local(q, k, v, segment_ids)
  batch, heads = sharding.BATCH_AXES, "tensor"
  qkv = P(batch, None, heads, None)

  def sharded(q, k, v, segment_ids):
    out, max_logits = local(q, k, v, segment_ids)
    return out, jax.lax.pmax(jax.lax.stop_gradient(max_logits), batch)  # no tangent: pmax has no JVP

  # check_vma=False: pallas_call's outputs carry no varying-axes annotation.
  return jax.shard_map(
    sharded, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch, None)), out_specs=(qkv, P(heads)), check_vma=False
  )(q, k, v, segment_ids)


def latent_attention(
  q_latent: jax.Array,
  q_rope: jax.Array,
  cache_latent: jax.Array,
  cache_rope: jax.Array,
  lengths: jax.Array,
  scale: float,
  *,
  impl: str = "auto",
) -> jax.Array:
  """Multi-query attention over the latent cache, the latent being both key (with the rope key) and value.

  q_latent: [B, H, C]; q_rope: [B, H, Dr]; cache_latent: [B, T, C]; cache_rope: [B, T, Dr]; lengths: [B] ≥ 1.
  impl: "xla", "pallas" (pallas_kernels.mla_decode) or "auto" (see `kimi_jax.backend`).
  Returns [B, H, C] in q_latent's dtype.
  """
  if backend.resolve("attention", impl) == "pallas":
    import pallas_kernels  # standalone package; imported only when this impl is chosen

    return pallas_kernels.mla_decode(
      q_latent, q_rope, cache_latent, cache_rope, lengths, scale, **backend.pallas_options()
    )
  f32 = jnp.float32
  logits = jnp.einsum("bhc,btc->bht", q_latent, cache_latent, preferred_element_type=f32)
  logits += jnp.einsum("bhr,btr->bht", q_rope, cache_rope, preferred_element_type=f32)
  probs = _masked_softmax(logits * scale, lengths)
  return jnp.einsum("bht,btc->bhc", probs.astype(cache_latent.dtype), cache_latent).astype(q_latent.dtype)


def expanded_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, scale: float) -> jax.Array:
  """Multi-head attention over a per-head cache (XLA only).

  q: [B, H, Dn + Dr]; k: [B, T, H, Dn + Dr]; v: [B, T, H, Dv]; lengths: [B] ≥ 1 -> [B, H, Dv].
  """
  logits = jnp.einsum("bhd,bthd->bht", q, k, preferred_element_type=jnp.float32)
  probs = _masked_softmax(logits * scale, lengths)
  return jnp.einsum("bht,bthd->bhd", probs.astype(v.dtype), v)


def _masked_softmax(logits: jax.Array, lengths: jax.Array) -> jax.Array:
  """logits: [B, H, T] f32; positions ≥ lengths[b] get zero weight."""
  valid = jnp.arange(logits.shape[-1])[None, None, :] < lengths[:, None, None]
  return jax.nn.softmax(jnp.where(valid, logits, jnp.finfo(jnp.float32).min), axis=-1)
