"""MLA decode over a per-token cache, using an `MLA` module's own parameters (no extra weights).

Letters: B batch, S new tokens (prompt length in prefill, 1 in decode), T cache length (allocated), H heads,
C latent rank (kv_lora_rank), Dn / Dr / Dv nope / rope / value head dims.

Two cache kinds, each a dict of arrays [B, T, ...] per layer:
  latent    {"latent": [B, T, C], "rope": [B, T, Dr]}: the normalised latent c = norm(kv_a(x)[:C]) and the
            post-RoPE rope key shared by all heads; C + Dr values per token (K2: 512 + 64 = 576).
  expanded  {"k": [B, T, H, Dn + Dr], "v": [B, T, H, Dv]}: per-head keys and values as a plain MHA cache
            would hold them; H·(Dn + Dr + Dv) values per token (K2: 20480, 35.6x the latent cache). Kept as
            the baseline the latent cache is measured against.

Absorbed decode (latent): with kv_b's kernel split per head into W_uk [C, H, Dn] and W_uv [C, H, Dv],
  q·k_t = q_n·(W_ukᵀ c_t) + q_r·k_r,t = (W_uk q_n)·c_t + q_r·k_r,t      q̃ = W_uk q_n   [H, C]
  Σ_t p_t v_t = W_uvᵀ (Σ_t p_t c_t)
so attention is multi-query over one (C + Dr) key per token with c as the value, and W_uv is applied once
after the sum. The softmax scale stays the model's (Dn + Dr)^-0.5 · m², not (C + Dr)^-0.5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kimi_jax.config import ModelConfig
from kimi_jax.layers.kernels import pallas_options, resolve_attention_impl
from kimi_jax.layers.mla import MLA
from kimi_jax.layers.rope import apply_rope

CACHE_KINDS = ("latent", "expanded")


def cache_spec(cfg: ModelConfig, kind: str) -> dict[str, tuple[int, ...]]:
  """Per-token feature shape of each cache array for one layer."""
  if kind == "latent":
    return {"latent": (cfg.kv_lora_rank,), "rope": (cfg.qk_rope_head_dim,)}
  if kind == "expanded":
    h = cfg.num_attention_heads
    return {"k": (h, cfg.qk_head_dim), "v": (h, cfg.v_head_dim)}
  raise ValueError(f"cache kind must be one of {CACHE_KINDS}, got {kind!r}")


def cache_entry(attn: MLA, x: jax.Array, cos: jax.Array, sin: jax.Array, kind: str) -> dict[str, jax.Array]:
  """x: [B, S, D] (the attention input); cos, sin: [B, S, Dr/2] -> {name: [B, S, ...]} in x's dtype."""
  cfg = attn.cfg
  c = cfg.kv_lora_rank
  latent_and_rope = attn.kv_a(x)
  latent = attn.kv_a_norm(latent_and_rope[..., :c])
  k_rope = apply_rope(latent_and_rope[..., c:], cos, sin).astype(x.dtype)
  if kind == "latent":
    return {"latent": latent, "rope": k_rope}
  b, s, _ = x.shape
  h, dn = cfg.num_attention_heads, cfg.qk_nope_head_dim
  kv = attn.kv_b(latent).reshape(b, s, h, dn + cfg.v_head_dim)
  k = jnp.concatenate([kv[..., :dn], jnp.broadcast_to(k_rope[:, :, None], (b, s, h, cfg.qk_rope_head_dim))], -1)
  return {"k": k, "v": kv[..., dn:]}


def decode_attention(attn: MLA, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: dict[str, jax.Array],
                     lengths: jax.Array, kind: str, *, impl: str = "auto") -> jax.Array:
  """One new token per row attending to its first lengths[b] cache entries (its own entry included).

  x: [B, 1, D]; cos, sin: [B, 1, Dr/2]; cache: one layer's arrays [B, T, ...]; lengths: [B] int32.
  impl: "xla", "pallas" (pallas_kernels.mla_decode; latent cache only) or "auto" (see
  `kernels.resolve_attention_impl`). Returns out [B, 1, D].
  """
  cfg = attn.cfg
  b = x.shape[0]
  h, dn, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
  q = attn.q_b(attn.q_a_norm(attn.q_a(x))).reshape(b, h, cfg.qk_head_dim)
  q_nope = q[..., :dn]
  q_rope = apply_rope(q[:, None, :, dn:], cos, sin)[:, 0].astype(q.dtype)  # [B, H, Dr]
  if kind == "expanded":
    if resolve_attention_impl(impl) == "pallas":
      raise ValueError("the pallas decode kernel reads the latent cache; use impl='xla' with kind='expanded'")
    out = _expanded_attention(jnp.concatenate([q_nope, q_rope], -1), cache["k"], cache["v"], lengths,
                              cfg.softmax_scale)
  else:
    w_kv = attn.kv_b.kernel[...].astype(q.dtype).reshape(cfg.kv_lora_rank, h, dn + dv)
    q_latent = jnp.einsum("bhn,chn->bhc", q_nope, w_kv[..., :dn])
    out_latent = latent_attention(q_latent, q_rope, cache["latent"], cache["rope"], lengths,
                                  cfg.softmax_scale, impl=impl)
    out = jnp.einsum("bhc,chv->bhv", out_latent, w_kv[..., dn:])
  return attn.o(out.reshape(b, 1, h * dv))


def latent_attention(q_latent: jax.Array, q_rope: jax.Array, cache_latent: jax.Array, cache_rope: jax.Array,
                     lengths: jax.Array, scale: float, *, impl: str = "auto") -> jax.Array:
  """Multi-query attention over the latent cache, softmax in float32.

  q_latent: [B, H, C]; q_rope: [B, H, Dr]; cache_latent: [B, T, C]; cache_rope: [B, T, Dr]; lengths: [B] ≥ 1.
  Returns [B, H, C] in q_latent's dtype.
  """
  if resolve_attention_impl(impl) == "pallas":
    import pallas_kernels  # standalone package; imported only when this impl is chosen

    return pallas_kernels.mla_decode(q_latent, q_rope, cache_latent, cache_rope, lengths, scale,
                                     **pallas_options())
  f32 = jnp.float32
  logits = jnp.einsum("bhc,btc->bht", q_latent, cache_latent, preferred_element_type=f32)
  logits += jnp.einsum("bhr,btr->bht", q_rope, cache_rope, preferred_element_type=f32)
  probs = _masked_softmax(logits * scale, lengths)
  return jnp.einsum("bht,btc->bhc", probs.astype(cache_latent.dtype), cache_latent).astype(q_latent.dtype)


def _expanded_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, scale: float) -> jax.Array:
  """q: [B, H, Dn + Dr]; k: [B, T, H, Dn + Dr]; v: [B, T, H, Dv]; lengths: [B] -> [B, H, Dv]."""
  logits = jnp.einsum("bhd,bthd->bht", q, k, preferred_element_type=jnp.float32)
  probs = _masked_softmax(logits * scale, lengths)
  return jnp.einsum("bht,bthd->bhd", probs.astype(v.dtype), v)


def _masked_softmax(logits: jax.Array, lengths: jax.Array) -> jax.Array:
  """logits: [B, H, T] f32; positions ≥ lengths[b] get zero weight."""
  valid = jnp.arange(logits.shape[-1])[None, None, :] < lengths[:, None, None]
  return jax.nn.softmax(jnp.where(valid, logits, jnp.finfo(jnp.float32).min), axis=-1)
