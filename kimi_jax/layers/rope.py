"""YaRN rotary embeddings in Kimi K2 / DeepSeek-V3's interleaved layout.

Letters (kimi_jax/__init__.py): B batch, S sequence, Dr rope dim (qk_rope_head_dim).

The checkpoint's rope dims are interleaved pairs: (x[2i], x[2i+1]) rotate together at frequency i.
transformers de-interleaves q and k the same way before a half rotation; a dot product is blind to that
shared permutation, so rotating the pairs in place gives the same attention and needs no weight permutation
in conversion.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.config import ModelConfig, yarn_mscale


def yarn_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Per-pair inverse frequencies [Dr/2] (float32): YaRN-blended between extrapolation and interpolation when
  `cfg.yarn_active`, plain RoPE (θ^(−2i/Dr)) otherwise."""
  dim, base, factor = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_factor
  inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  if not cfg.yarn_active:
    return inv_freq.astype(np.float32)

  def correction_dim(rotations: float) -> float:
    return dim * math.log(cfg.rope_original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
  high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
  if low == high:
    high += 0.001  # transformers' guard against a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  # ramp 0 keeps the original frequency (high-frequency dims); ramp 1 divides it by `factor`.
  return (inv_freq * ((1.0 - ramp) + ramp / factor)).astype(np.float32)


def rope_attention_scaling(cfg: ModelConfig) -> float:
  """YaRN's cos/sin multiplier mscale(factor, mscale) / mscale(factor, mscale_all_dim); 1.0 for K2."""
  if not cfg.yarn_active:
    return 1.0
  return yarn_mscale(cfg.rope_factor, cfg.rope_mscale) / yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim)


def rope_cos_sin(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """positions: [B, S] int -> cos, sin: [B, S, R/2] float32."""
  inv_freq = jnp.asarray(yarn_inv_freq(cfg))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  scale = rope_attention_scaling(cfg)
  return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate interleaved pairs. x: [B, S, ..., Dr]; cos, sin: [B, S, R/2] -> x's shape, float32."""
  extra = x.ndim - cos.ndim
  cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
  sin = sin.reshape(cos.shape)
  pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  even, odd = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  return rotated.reshape(x.shape)
