"""Multi-head Latent Attention (DeepSeek-V3 / Kimi K2): training, prefill and decode.

Letters: B batch, S new tokens, T cache length, D model, H heads, Cq / C q / kv latent ranks, Dn / Dr / Dv nope /
rope / value head dims.

  q        = q_b(norm(q_a(x)))                  [B, S, H, Dn + Dr]
  c, k_r   = norm(kv_a(x)[:C]), kv_a(x)[C:]     [B, S, C], [B, S, Dr] (one rope key shared by all heads)
  k_n, v   = kv_b(c)                            [B, S, H, Dn], [B, S, H, Dv]
  out      = o(attention([q_n, rope(q_r)], [k_n, rope(k_r)], v))
Kernel column layouts match the checkpoint's row layouts (per head: nope then rope for q_b; nope then value
for kv_b), so conversion is a transpose and MuonClip's qk-clip can find each head's rows.

With a cache (`layers.cache`) the same projections also give the cache entries, and feed one of two attentions:
a prefill (S > 1, from position 0) attends over its own tokens as in training; a decode step (S == 1) attends over
the cache, its own entry written first. For the latent cache that attention is absorbed: with kv_b's kernel split
per head into W_uk [C, H, Dn] and W_uv [C, H, Dv],
  q·k_t = q_n·(W_ukᵀ c_t) + q_r·k_r,t = (W_uk q_n)·c_t + q_r·k_r,t      q̃ = W_uk q_n   [H, C]
  Σ_t p_t v_t = W_uvᵀ (Σ_t p_t c_t)
so attention is multi-query over one (C + Dr) key per token with c as the value, and W_uv is applied once
after the sum. The softmax scale stays the model's (Dn + Dr)^-0.5 · m², not (C + Dr)^-0.5.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from kimi_jax import backend
from kimi_jax.config import ModelConfig
from kimi_jax.layers.attention import expanded_attention, latent_attention, mla_attention
from kimi_jax.layers.cache import LayerCache, cache_entry
from kimi_jax.layers.linear import Linear
from kimi_jax.layers.norms import RMSNorm
from kimi_jax.layers.rope import apply_rope

# transformers' DeepseekV3 builds q_a_layernorm and kv_a_layernorm with the default eps, whatever the config.
LATENT_NORM_EPS = 1e-6


class MLA(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    h, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_a = Linear(cfg.hidden_size, cfg.q_lora_rank, ("embed", "q_lora"), **kw)
    self.q_a_norm = RMSNorm(cfg.q_lora_rank, eps=LATENT_NORM_EPS, name="q_lora", param_dtype=param_dtype)
    self.q_b = Linear(cfg.q_lora_rank, h * (dn + dr), ("q_lora", "heads"), **kw)
    self.kv_a = Linear(cfg.hidden_size, cfg.kv_lora_rank + dr, ("embed", "kv_lora"), **kw)
    self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, eps=LATENT_NORM_EPS, name="kv_lora", param_dtype=param_dtype)
    self.kv_b = Linear(cfg.kv_lora_rank, h * (dn + dv), ("kv_lora", "heads"), **kw)
    self.o = Linear(h * dv, cfg.hidden_size, ("heads", "embed"), **kw)
    self.cfg = cfg

  def __call__(
    self,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    segment_ids: jax.Array,
    *,
    cache: LayerCache | None = None,
    positions: jax.Array | None = None,
    impl: str | None = None,
  ) -> tuple[jax.Array, jax.Array | None, LayerCache | None]:
    """x: [B, S, D]; cos, sin: [B, S, Dr/2]; segment_ids: [B, S] (0 = padding); positions: [B, S], with a cache.

    cache: None (training), or this layer's cache: S > 1 is a prefill from position 0 (the cache is only
    written); S == 1 a decode step at positions[:, 0], over the entries before it and its own.
    impl: attention implementation, default cfg.attention_impl.
    Returns (out [B, S, D]; max_logits [H] float32, None in a decode step; the cache with the new entries).
    """
    cfg = self.cfg
    b, s, _ = x.shape
    h, dn, dv, ckv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    impl = cfg.attention_impl if impl is None else impl
    q = self.q_b(self.q_a_norm(self.q_a(x))).reshape(b, s, h, cfg.qk_head_dim)
    latent_and_rope = self.kv_a(x)
    latent = self.kv_a_norm(latent_and_rope[..., :ckv])
    kv = self.kv_b(latent).reshape(b, s, h, dn + dv)  # unused, so removed by XLA, in a latent decode step
    q_rope = apply_rope(q[..., dn:], cos, sin).astype(q.dtype)
    k_rope = apply_rope(latent_and_rope[..., ckv:], cos, sin).astype(q.dtype)
    if cache is not None:
      cache = cache.write(cache_entry(cache.kind, latent, k_rope, kv[..., :dn], kv[..., dn:]), positions)
    if cache is None or s > 1:
      out, max_logits = mla_attention(
        q[..., :dn], q_rope, kv[..., :dn], k_rope, kv[..., dn:], segment_ids, scale=cfg.softmax_scale, impl=impl
      )
    else:
      out = self._decode_attention(q[:, 0, :, :dn], q_rope[:, 0], cache, positions[:, 0] + 1, impl)
      max_logits = None  # a training statistic (qk-clip)
    return self.o(out.reshape(b, s, h * dv)), max_logits, cache

  def _decode_attention(
    self, q_nope: jax.Array, q_rope: jax.Array, cache: LayerCache, lengths: jax.Array, impl: str
  ) -> jax.Array:
    """q_nope: [B, H, Dn]; q_rope: [B, H, Dr]; the layer's cache [B, T, ...], row b valid below lengths[b] [B].

    impl: "xla", "pallas" (pallas_kernels.mla_decode; latent cache only) or "auto". Returns [B, H, Dv].
    """
    cfg = self.cfg
    h, dn, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    arrays = cache.read()
    if cache.kind == "expanded":
      if backend.resolve("attention", impl) == "pallas":
        raise ValueError("the pallas decode kernel reads the latent cache; use impl='xla' with kind='expanded'")
      return expanded_attention(
        jnp.concatenate([q_nope, q_rope], -1), arrays["k"], arrays["v"], lengths, cfg.softmax_scale
      )
    w_kv = self.kv_b.kernel[...].astype(q_nope.dtype).reshape(cfg.kv_lora_rank, h, dn + dv)
    q_latent = jnp.einsum("bhn,chn->bhc", q_nope, w_kv[..., :dn])
    out_latent = latent_attention(
      q_latent, q_rope, arrays["latent"], arrays["rope"], lengths, cfg.softmax_scale, impl=impl
    )
    return jnp.einsum("bhc,chv->bhv", out_latent, w_kv[..., dn:])
