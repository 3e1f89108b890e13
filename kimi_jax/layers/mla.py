"""Multi-head Latent Attention (DeepSeek-V3 / Kimi K2), training and prefill path.

Letters: B batch, S sequence, D model, H heads, Cq / Ckv q / kv latent ranks, Dn / Dr / Dv nope / rope /
value head dims.

  q        = q_b(norm(q_a(x)))                  [B, S, H, Dn + Dr]
  c, k_r   = kv_a(x)                            [B, S, Ckv], [B, S, Dr] (one rope key shared by all heads)
  k_n, v   = kv_b(norm(c))                      [B, S, H, Dn], [B, S, H, Dv]
  out      = o(attention([q_n, rope(q_r)], [k_n, rope(k_r)], v))
Kernel column layouts match the checkpoint's row layouts (per head: nope then rope for q_b; nope then value
for kv_b), so conversion is a transpose and MuonClip's qk-clip can find each head's rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kimi_jax.config import ModelConfig
from kimi_jax.layers.attention import mla_attention
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

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
               segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [B, S, D]; cos, sin: [B, S, Dr/2]; segment_ids: [B, S] (0 = padding).

    Returns (out [B, S, D], max_logits [H] float32).
    """
    cfg = self.cfg
    b, s, _ = x.shape
    h, dn, dv, ckv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    q = self.q_b(self.q_a_norm(self.q_a(x))).reshape(b, s, h, cfg.qk_head_dim)
    latent_and_rope = self.kv_a(x)
    kv = self.kv_b(self.kv_a_norm(latent_and_rope[..., :ckv])).reshape(b, s, h, dn + dv)
    q_rope = apply_rope(q[..., dn:], cos, sin).astype(q.dtype)
    k_rope = apply_rope(latent_and_rope[..., ckv:], cos, sin).astype(q.dtype)
    out, max_logits = mla_attention(q[..., :dn], q_rope, kv[..., :dn], k_rope, kv[..., dn:], segment_ids,
                                    scale=cfg.softmax_scale, impl=cfg.attention_impl)
    return self.o(out.reshape(b, s, h * dv)), max_logits
