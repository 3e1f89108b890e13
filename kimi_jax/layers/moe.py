"""Mixture of experts: sigmoid router with a selection-only bias, routed experts and a shared expert.

Letters (kimi_jax/__init__.py): B batch, S sequence, N = B·S tokens, D model, E experts, K experts per token, Fe
expert hidden.

Router (transformers' DeepseekV3 `noaux_tc`): s = sigmoid(x·W) in float32; choose the top K of s + bias
(optionally within the best `topk_group` of `n_group` groups, ranked by the sum of each group's best two; the
other groups' experts are set to -inf before the top K, as in transformers 5.24 and DeepSeek-V3's own gate, so they
are never chosen — transformers 4.x used 0.0, which let them win when a kept expert scored below zero after the
bias); the weights are the chosen *unbiased* s,
normalised to sum 1 and times routed_scaling_factor. The bias is not a Param: it receives no gradient and
is updated between steps from the expert load (aux-loss-free balancing, see kimi_jax/training/step.py).
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from kimi_jax.config import ModelConfig
from kimi_jax.layers.experts import routed_experts
from kimi_jax.layers.linear import param
from kimi_jax.layers.mlp import MLP


class RouterBias(nnx.Variable):
  """e_score_correction_bias [E]: steers expert selection, never the weights; outside the optimizer."""


def route(scores: jax.Array, bias: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """scores: [N, E] sigmoid outputs (f32); bias: [E] -> (weights [N, K] f32, idx [N, K] int32)."""
  choice = scores + bias
  if cfg.n_group > 1:
    t, e = choice.shape
    grouped = choice.reshape(t, cfg.n_group, e // cfg.n_group)
    group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, n_group]: sum of each group's best two
    _, keep = jax.lax.top_k(group_score, cfg.topk_group)
    group_mask = jnp.zeros_like(group_score, bool).at[jnp.arange(t)[:, None], keep].set(True)
    choice = jnp.where(group_mask[..., None], grouped, -jnp.inf).reshape(t, e)
  _, idx = jax.lax.top_k(choice, cfg.num_experts_per_tok)
  weights = jnp.take_along_axis(scores, idx, axis=-1)
  if cfg.norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return weights * cfg.routed_scaling_factor, idx.astype(jnp.int32)


class Router(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.kernel = param(
      rngs,
      (cfg.hidden_size, cfg.n_routed_experts),
      ("embed", None),
      std=cfg.initializer_range,
      dtype=jnp.dtype(cfg.param_dtype),
    )
    self.bias = RouterBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32))
    self.cfg = cfg

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [N, D] -> (weights [N, K] f32, idx [N, K] int32)."""
    # True float32: the default precision is one bf16 pass on TPU and TF32 on GPU, enough to flip near-tied
    # top-K choices against transformers' float32 router.
    with jax.named_scope("router_logits"):  # the name tests find in compiled HLO
      logits = jnp.dot(x.astype(jnp.float32), self.kernel[...].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    scores = jax.nn.sigmoid(logits)
    return route(scores, self.bias[...], self.cfg)


class Experts(nnx.Module):
  """E SwiGLU experts stored stacked: gate, up [E, D, Fe]; down [E, Fe, D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    kw = dict(std=cfg.initializer_range, dtype=jnp.dtype(cfg.param_dtype))
    self.gate = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), **kw)
    self.up = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), **kw)
    self.down = param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), **kw)
    self.cfg = cfg

  def __call__(self, x: jax.Array, weights: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [N, D]; weights, idx: [N, K] -> ([N, D], dropped pairs: int32 scalar)."""
    dtype = jnp.dtype(self.cfg.dtype)
    return routed_experts(
      x.astype(dtype),
      idx,
      weights,
      self.gate[...].astype(dtype),
      self.up[...].astype(dtype),
      self.down[...].astype(dtype),
      impl=self.cfg.moe_impl,
      capacity_factor=self.cfg.moe_capacity_factor,
    )


class MoE(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.router = Router(cfg, rngs=rngs)
    self.experts = Experts(cfg, rngs=rngs)
    self.shared = (
      MLP(
        cfg.hidden_size,
        cfg.shared_intermediate_size,
        std=cfg.initializer_range,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      )
      if cfg.n_shared_experts
      else None
    )
    self.cfg = cfg

  def __call__(self, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x: [B, S, D]; valid: [B, S] bool (False on padding).

    Returns (out [B, S, D], stats: expert_load [E] int32, valid tokens routed to each expert; dropped_pairs,
    (token, expert) pairs dropped by a bounded expert-parallel capacity).

    With `cfg.moe_seq_chunk` = C < S the sequence goes through in S / C pieces, one after another, each
    recomputed in the backward pass: the dispatch buffers ([pairs, D] per buffer, ~7 GiB each for 32K tokens per
    chip at K2's size) then exist for C positions at a time. Routing is per token, so the result is the same
    (with a capacity factor, capacity applies per piece).
    """
    chunk = self.cfg.moe_seq_chunk
    b, s, d = x.shape
    if not chunk or chunk >= s:
      return self._apply(x, valid)
    if s % chunk:
      raise ValueError(f"ModelConfig.moe_seq_chunk={chunk} does not divide the sequence length {s}")
    pieces = lambda a: jnp.moveaxis(a.reshape((b, s // chunk, chunk) + a.shape[2:]), 1, 0)  # [S/C, B, C, ...]
    graphdef, state = nnx.split(self)

    @jax.checkpoint
    def body(totals, piece):
      out, stats = nnx.merge(graphdef, state)._apply(*piece)
      return jax.tree.map(jnp.add, totals, stats), out

    zeros = {
      "expert_load": jnp.zeros((self.cfg.n_routed_experts,), jnp.int32),
      "dropped_pairs": jnp.zeros((), jnp.int32),
    }
    stats, out = jax.lax.scan(body, zeros, (pieces(x), pieces(valid)))
    return jnp.moveaxis(out, 0, 1).reshape(b, s, d), stats

  def _apply(self, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`__call__` on the whole of x at once."""
    b, s, d = x.shape
    tokens = x.reshape(b * s, d)
    weights, idx = self.router(tokens)
    out, dropped = self.experts(tokens, weights, idx)
    if self.shared is not None:
      out = out + self.shared(tokens)
    counted = jnp.broadcast_to(valid.reshape(b * s, 1), idx.shape).reshape(-1).astype(jnp.int32)
    load = jnp.bincount(idx.reshape(-1), weights=counted, length=self.router.bias.shape[0])
    return out.reshape(b, s, d), {"expert_load": load.astype(jnp.int32), "dropped_pairs": dropped}
