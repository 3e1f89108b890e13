"""A small training run (the tiny model shrunk further, 4 experts, 32-token sequences) and its metrics: shared by
tests/train and tests/gcs."""

import json

from kimi_jax.train_config import base_config

# A two-layer MoE model small enough to train in seconds on a CPU (byte-level vocabulary and then some).
SMALL_MODEL = dict(
  hidden_size=32,
  intermediate_size=64,
  moe_intermediate_size=16,
  n_routed_experts=4,
  num_experts_per_tok=2,
  num_hidden_layers=2,
  q_lora_rank=16,
  kv_lora_rank=16,
  qk_nope_head_dim=8,
  qk_rope_head_dim=8,
  v_head_dim=8,
  num_attention_heads=2,
  vocab_size=260,
  dtype="float32",
)


def small_config(steps):
  c = base_config("tiny")
  c.model.update(**SMALL_MODEL)
  c.update(
    steps=steps,
    batch_size=4,
    seq_len=32,
    learning_rate=1e-2,
    warmup_steps=2,
    log_every=1,
    checkpoint_every=4,
    sample_tokens=0,
    router_bias_update_rate=1e-2,
  )
  return c


def read_metrics(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]
