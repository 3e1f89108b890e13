"""The shape MaxText 0.2.5 was timed on (1,160 tokens/s on a 2-core CPU): hidden 256, 4 heads, dense MLP 512,
expert MLP 128, 4 layers (first dense), 16 experts top-4 + 1 shared, q_lora 64, kv_lora 32, nope/rope/v 32/16/32,
vocab 1024, batch 8×256, bf16 compute, AdamW. Used by benchmarks/train_step.py.
"""

from kimi_jax.train_config import base_config


def get_config():
  c = base_config("tiny")
  c.model.update(
    vocab_size=1024,
    hidden_size=256,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    intermediate_size=512,
    moe_intermediate_size=128,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_shared_experts=1,
    num_attention_heads=4,
    q_lora_rank=64,
    kv_lora_rank=32,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    dtype="bfloat16",
  )
  c.batch_size = 8
  c.seq_len = 256
  return c
