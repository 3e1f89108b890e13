"""A ~100 M-parameter proxy with Kimi K2's shape rules (MLA, 1 dense + MoE layers, sigmoid top-k + shared
expert), for benchmarks and quick single-host experiments."""

from kimi_jax.train_config import base_config


def get_config():
  c = base_config("tiny")
  c.model.update(
    vocab_size=32768,
    hidden_size=512,
    num_hidden_layers=6,
    first_k_dense_replace=1,
    intermediate_size=1536,
    moe_intermediate_size=256,
    n_routed_experts=32,
    num_experts_per_tok=4,
    n_shared_experts=1,
    num_attention_heads=8,
    q_lora_rank=192,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    bos_token_id=256,
    eos_token_id=257,
  )
  c.batch_size = 8
  c.seq_len = 256
  return c
