"""The attention cache for generation: its kinds, their shapes, and how new entries are written.

Letters: L stacked layers, B batch, S new tokens, T cache length (allocated), H heads, C latent rank
(kv_lora_rank), Dn / Dr / Dv nope / rope / value head dims.

A model's cache is {layer group: {name: [L, B, T, ...]}} in the compute dtype (`model.init_cache`); the layer scan
carries a group's buffers and hands each layer a `LayerCache`, through which it writes its new entries
{name: [B, S, ...]} and reads its arrays {name: [B, T, ...]}. Two kinds:
  latent    {"latent": [., C], "rope": [., Dr]}: the normalised latent c = norm(kv_a(x)[:C]) and the post-RoPE
            rope key shared by all heads; C + Dr values per token (K2: 512 + 64 = 576). Decoded with absorbed
            weights (`layers.mla`).
  expanded  {"k": [., H, Dn + Dr], "v": [., H, Dv]}: per-head keys and values as a plain MHA cache would hold
            them; H·(Dn + Dr + Dv) values per token (K2: 20480, 35.6x the latent cache). Kept as the baseline
            the latent cache is measured against.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kimi_jax import sharding
from kimi_jax.config import ModelConfig

CACHE_KINDS = ("latent", "expanded")
CACHE_AXES = ("layers", "batch", "seq")  # logical names of a stacked buffer's [L, B, T] dims; per-token dims whole

Cache = dict[str, dict[str, jax.Array]]  # {layer group: {name: [L, B, T, ...]}}


def cache_spec(cfg: ModelConfig, kind: str) -> dict[str, tuple[int, ...]]:
  """Per-token feature shape of each cache array for one layer."""
  if kind == "latent":
    return {"latent": (cfg.kv_lora_rank,), "rope": (cfg.qk_rope_head_dim,)}
  if kind == "expanded":
    h = cfg.num_attention_heads
    return {"k": (h, cfg.qk_head_dim), "v": (h, cfg.v_head_dim)}
  raise ValueError(f"cache kind must be one of {CACHE_KINDS}, got {kind!r}")


def cache_entry(
  kind: str, latent: jax.Array, k_rope: jax.Array, k_nope: jax.Array, v: jax.Array
) -> dict[str, jax.Array]:
  """What a layer caches for its new tokens. latent: [B, S, C]; k_rope: [B, S, Dr]; k_nope: [B, S, H, Dn];
  v: [B, S, H, Dv] -> {name: [B, S, ...]}."""
  if kind == "latent":
    return {"latent": latent, "rope": k_rope}
  shape = k_nope.shape[:3] + k_rope.shape[-1:]
  return {"k": jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], shape)], -1), "v": v}


class LayerCache(NamedTuple):
  """One layer's place in a group's cache: the stacked buffers {name: [L, B, T, ...]} and the layer's index.

  The layer scan carries the whole buffers, so a layer writes its entries in place and then reads its slice
  (scanning slices in and out instead would copy the cache every step).
  """

  buffers: dict[str, jax.Array]
  layer: jax.Array  # [] int32

  @property
  def kind(self) -> str:
    return "latent" if "latent" in self.buffers else "expanded"

  def write(self, entries: dict[str, jax.Array], positions: jax.Array) -> LayerCache:
    """entries {name: [B, S, ...]}; positions [B, S]. S > 1 is a prefill, written at 0..S-1; S == 1 is one decode
    step, row b's entry written at positions[b, 0]."""

    def one(buf: jax.Array, entry: jax.Array) -> jax.Array:
      if entry.shape[1] > 1:
        return jax.lax.dynamic_update_slice(buf, entry[None], (self.layer,) + (0,) * (buf.ndim - 1))
      return buf.at[self.layer, jnp.arange(buf.shape[1]), positions[:, 0]].set(entry[:, 0])

    return self._replace(buffers={name: one(buf, entries[name]) for name, buf in self.buffers.items()})

  def read(self) -> dict[str, jax.Array]:
    """This layer's arrays {name: [B, T, ...]}."""
    return {name: buf[self.layer] for name, buf in self.buffers.items()}


def constrain_cache(buffers: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Stacked buffers [L, B, T, ...]: under an active mesh B is split like the batch (`CACHE_AXES`), so a donated
  cache comes back laid out as it went in and every decode step reuses one compiled layout; identity without one."""
  return {name: sharding.constrain(a, CACHE_AXES + (None,) * (a.ndim - len(CACHE_AXES))) for name, a in buffers.items()}
