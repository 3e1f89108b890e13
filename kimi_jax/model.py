"""Kimi K2: embed → dense layers → MoE layers → final norm → lm_head.

Letters: B batch, S sequence (new tokens), T cache length, D model, V vocab, H heads, E experts, L stacked layers.

Each group of layers (the first `first_k_dense_replace` dense ones, then the MoE ones) is created stacked,
every parameter with a leading L axis (logical name "layers"), and applied with `jax.lax.scan`, so compile
time does not grow with depth. Either group may be empty.

One forward serves training, prefill and decode: given a cache (`init_cache`, kinds in `layers.cache`), the scan
carries each group's buffers [L, B, T, ...] and every layer writes its new entries [B, S, ...] there and reads its
own [B, T, ...]; `layers.mla` picks the attention.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from kimi_jax.config import ModelConfig
from kimi_jax.layers.cache import Cache, LayerCache, cache_spec, constrain_cache
from kimi_jax.layers.linear import Linear, param
from kimi_jax.layers.mla import MLA
from kimi_jax.layers.mlp import MLP
from kimi_jax.layers.moe import MoE
from kimi_jax.layers.norms import RMSNorm
from kimi_jax.layers.rope import rope_cos_sin
from kimi_jax.sharding import constrain

LAYER_GROUPS = ("dense_layers", "moe_layers")
ACTIVATION = ("batch", "seq", "act_embed")  # logical axes of the residual stream [B, S, D]

_REMAT_POLICIES = {
  "full": None,  # save nothing, recompute the layer in the backward pass
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)) with a dense MLP or the MoE."""

  def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs):
    param_dtype = jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, name="embed", param_dtype=param_dtype)
    self.attn = MLA(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, name="embed", param_dtype=param_dtype)
    if moe:
      self.mlp = MoE(cfg, rngs=rngs)
    else:
      self.mlp = MLP(
        cfg.hidden_size,
        cfg.intermediate_size,
        std=cfg.initializer_range,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=param_dtype,
        rngs=rngs,
      )
    self.moe = moe

  def __call__(
    self,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    *,
    cache: LayerCache | None = None,
    attention_impl: str | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array], LayerCache | None]:
    """x: [B, S, D]; positions: [B, S]; cache: None (training) or this layer's (see `MLA.__call__`).

    Returns (x [B, S, D]; stats: max_logits [H] (None in a decode step) and, for MoE, expert_load [E],
    dropped_pairs; the cache with this layer's new entries).
    """
    attn_out, max_logits, cache = self.attn(
      self.attn_norm(x), cos, sin, segment_ids, cache=cache, positions=positions, impl=attention_impl
    )
    x = x + attn_out.astype(x.dtype)
    stats = {"max_logits": max_logits}
    if self.moe:
      mlp_out, moe_stats = self.mlp(self.mlp_norm(x), segment_ids != 0)
      stats.update(moe_stats)
    else:
      mlp_out = self.mlp(self.mlp_norm(x))
    return x + mlp_out.astype(x.dtype), stats, cache


class Embed(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.embedding = param(
      rngs,
      (cfg.vocab_size, cfg.hidden_size),
      ("vocab", "embed"),
      std=cfg.initializer_range,
      dtype=jnp.dtype(cfg.param_dtype),
    )

  def __call__(self, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """tokens: [B, S] int -> [B, S, D]."""
    return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)


def _stacked_layers(cfg: ModelConfig, count: int, *, moe: bool, rngs: nnx.Rngs) -> DecoderLayer:
  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs: nnx.Rngs) -> DecoderLayer:
    return DecoderLayer(cfg, moe=moe, rngs=rngs)

  return make(rngs)


class KimiK2(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg, rngs=rngs)
    if cfg.num_dense_layers:
      self.dense_layers = _stacked_layers(cfg, cfg.num_dense_layers, moe=False, rngs=rngs)
    if cfg.num_moe_layers:
      self.moe_layers = _stacked_layers(cfg, cfg.num_moe_layers, moe=True, rngs=rngs)
    self.final_norm = RMSNorm(
      cfg.hidden_size, eps=cfg.rms_norm_eps, name="embed", param_dtype=jnp.dtype(cfg.param_dtype)
    )
    self.lm_head = Linear(
      cfg.hidden_size,
      cfg.vocab_size,
      ("embed", "vocab"),
      std=cfg.initializer_range,
      dtype=jnp.dtype(cfg.dtype),
      param_dtype=jnp.dtype(cfg.param_dtype),
      rngs=rngs,
    )

  def __call__(
    self,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: Cache | None = None,
    attention_impl: str | None = None,
    return_hidden: bool = False,
  ) -> tuple[jax.Array, dict[str, Any]]:
    """tokens: [B, S] int; positions: [B, S] (default 0..S-1); segment_ids: [B, S] (0 = padding; default 1).

    cache: None (training), or {group: {name: [L, B, T, ...]}} (`init_cache`). With S > 1 a prefill: the tokens
    are at positions 0..S-1 and attend among themselves, and their entries fill the cache's first S places.
    With S == 1 a decode step: row b's token is at positions[b, 0], is written there, and attends to the
    cache's first positions[b, 0] + 1 entries. attention_impl: overrides cfg.attention_impl for this call.

    Returns logits [B, S, V] float32 and aux:
      max_logits   {group: [L, H]} per layer and head, the largest scaled logit over unmasked pairs (None in a
                   decode step)
      expert_load  [L_moe, E] int32 valid tokens routed to each expert (absent without MoE layers)
      dropped_pairs  int32 (token, expert) pairs dropped by expert-parallel capacity, summed over layers
      hidden       [L + 1, B, S, D] embeddings then each layer's output (only with return_hidden)
      cache        the cache with the new entries written (only with a cache)
    """
    x, aux = self.features(
      tokens,
      positions=positions,
      segment_ids=segment_ids,
      cache=cache,
      attention_impl=attention_impl,
      return_hidden=return_hidden,
    )
    return self.logits(x), aux

  def logits(self, x: jax.Array) -> jax.Array:
    """x: [..., D] final-norm output -> logits [..., V] float32."""
    return lm_logits(x, self.lm_head.kernel[...])

  def features(
    self,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: Cache | None = None,
    attention_impl: str | None = None,
    return_hidden: bool = False,
  ) -> tuple[jax.Array, dict[str, Any]]:
    """Everything before the head: (final-norm output [B, S, D], aux as in `__call__`). Training feeds it to a
    chunked loss so that the f32 logits [B, S, V] never exist whole; generation picks the rows it needs."""
    cfg = self.cfg
    b, s = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if segment_ids is None:
      segment_ids = jnp.ones((b, s), jnp.int32)
    cos, sin = rope_cos_sin(positions, cfg)
    x = constrain(self.embed(tokens, jnp.dtype(cfg.dtype)), ACTIVATION)
    aux: dict[str, Any] = {"max_logits": {}}
    hidden = [x[None]]
    new_cache = {}
    for group in LAYER_GROUPS:
      if not hasattr(self, group):
        continue
      x, stats, layer_outputs, buffers = _scan_layers(
        getattr(self, group),
        x,
        (cos, sin, segment_ids, positions),
        None if cache is None else cache[group],
        remat=cfg.remat,
        return_hidden=return_hidden,
        attention_impl=attention_impl,
      )
      if cache is not None:
        new_cache[group] = constrain_cache(buffers)
      aux["max_logits"][group] = stats["max_logits"]
      if "expert_load" in stats:
        aux["expert_load"] = stats["expert_load"]
        aux["dropped_pairs"] = jnp.sum(stats["dropped_pairs"])
      hidden.append(layer_outputs)
    if return_hidden:
      aux["hidden"] = jnp.concatenate(hidden, axis=0)
    if cache is not None:
      aux["cache"] = new_cache
    return self.final_norm(x), aux


def lm_logits(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x: [..., D]; kernel: [D, V] -> logits [..., V], accumulated in float32."""
  return jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)


def _scan_layers(
  layers: DecoderLayer,
  x: jax.Array,
  consts: tuple,
  buffers: dict[str, jax.Array] | None,
  *,
  remat: str,
  return_hidden: bool,
  attention_impl: str | None,
):
  """Apply stacked `layers` in order; `consts` are a layer's positional inputs after x. buffers: the group's cache
  {name: [L, B, T, ...]} or None; carried through the scan, so each layer updates it in place.

  Returns (x, stats stacked over L, layer outputs [L, B, S, D] or None, the updated buffers or None).
  """
  graphdef, state = nnx.split(layers)

  def body(carry, xs):
    x, buffers = carry
    layer_state, index = xs
    cache = None if buffers is None else LayerCache(buffers, index)
    x, stats, cache = nnx.merge(graphdef, layer_state)(x, *consts, cache=cache, attention_impl=attention_impl)
    x = constrain(x, ACTIVATION)
    return (x, None if cache is None else cache.buffers), (stats, x if return_hidden else None)

  if remat != "none" and buffers is None:  # remat saves memory for the backward pass; generation has none
    body = jax.checkpoint(body, policy=_REMAT_POLICIES[remat], prevent_cse=False)
  index = None if buffers is None else jnp.arange(next(iter(buffers.values())).shape[0])
  (x, buffers), (stats, outputs) = jax.lax.scan(body, (x, buffers), (state, index))
  return x, stats, outputs, buffers


def init_cache(cfg: ModelConfig, batch: int, max_len: int, kind: str = "latent") -> Cache:
  """Zeroed cache {group: {name: [L, B, T, ...]}} in the compute dtype. Wrap in jax.eval_shape to size it."""
  spec = cache_spec(cfg, kind)
  layers = {"dense_layers": cfg.num_dense_layers, "moe_layers": cfg.num_moe_layers}
  return {
    group: {
      name: jnp.zeros((layers[group], batch, max_len) + shape, jnp.dtype(cfg.dtype)) for name, shape in spec.items()
    }
    for group in LAYER_GROUPS
    if layers[group]
  }


def check_tokens(tokens: Any, cfg: ModelConfig) -> None:
  """Host-side check before a forward pass: ids must lie in [0, vocab_size)."""
  import numpy as np

  arr = np.asarray(tokens)
  if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"tokens must be an integer array [batch, seq], got {arr.dtype} {arr.shape}")
  bad = (arr < 0) | (arr >= cfg.vocab_size)
  if bad.any():
    pos = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"token id {int(arr[pos])} at position {pos} is outside the vocabulary [0, {cfg.vocab_size})")
