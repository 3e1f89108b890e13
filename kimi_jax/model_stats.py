"""The model from its shapes alone (nothing is allocated): the abstract model, parameter counts and model FLOPs.

Counts come from `nnx.eval_shape` of the real model, so they cannot drift from the code; the FLOPs count the
matmul weights each token multiplies by, written out from the config.
"""

from __future__ import annotations

import math
from typing import Any

from flax import nnx
import jax

from kimi_jax.config import ModelConfig
from kimi_jax.model import KimiK2


def abstract_model(cfg: ModelConfig) -> KimiK2:
  """KimiK2(cfg) with jax.ShapeDtypeStruct leaves."""
  return nnx.eval_shape(lambda: KimiK2(cfg, rngs=nnx.Rngs(0)))


def abstract_state(cfg: ModelConfig) -> dict[str, Any]:
  """The model's variables (params and router biases) as a nested dict of ShapeDtypeStructs, shaped like
  `nnx.state(model, nnx.Variable).to_pure_dict()`."""
  return nnx.state(abstract_model(cfg), nnx.Variable).to_pure_dict()


def count_params(cfg: ModelConfig) -> dict[str, int]:
  """total_params (router biases included) and active_params (K of E routed experts per token)."""
  total = routed = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state(cfg))[0]:
    size = math.prod(leaf.shape)
    total += size
    if any(getattr(key, "key", None) == "experts" for key in path):
      routed += size
  active = total - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
  return {"total_params": total, "active_params": active}


def matmul_params_per_token(cfg: ModelConfig) -> int:
  """Weights each token multiplies by: active params minus the embedding lookup, norms and biases."""
  d = cfg.hidden_size
  h, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  attn = (
    d * cfg.q_lora_rank
    + cfg.q_lora_rank * h * (dn + dr)
    + d * (cfg.kv_lora_rank + dr)
    + cfg.kv_lora_rank * h * (dn + dv)
    + h * dv * d
  )
  dense_mlp = 3 * d * cfg.intermediate_size
  moe = 3 * d * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts) + d * cfg.n_routed_experts
  return cfg.num_hidden_layers * attn + cfg.num_dense_layers * dense_mlp + cfg.num_moe_layers * moe + d * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training token (forward + backward = 3 × forward), causal attention counted once.

  Forward: 2 FLOPs per matmul weight, plus q·k and p·v over the (seq_len + 1) / 2 keys a token sees on average.
  """
  attn_pairs = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
  forward = 2 * matmul_params_per_token(cfg) + 2 * attn_pairs * (seq_len + 1) / 2
  return 3 * forward


def train_flops_per_step(cfg: ModelConfig, batch_size: int, seq_len: int) -> float:
  """Model FLOPs of one training step on a global batch of batch_size sequences of seq_len tokens."""
  return train_flops_per_token(cfg, seq_len) * (batch_size * seq_len)
