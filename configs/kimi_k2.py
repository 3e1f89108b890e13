"""Kimi K2 stage 1: pretraining at 4K with plain RoPE, MuonClip, on a TPU v5p pod (K2's published recipe).

    python -m kimi_jax.tools.plan --config configs/kimi_k2.py --json                 # what the run will do
    python -m kimi_jax.tools.aot --config configs/kimi_k2.py --topology v5p:8x8x8    # does it fit? (CPU host)
    python -m kimi_jax.train --config configs/kimi_k2.py --workdir gs://BUCKET/k2    # on the pod

Stages: this file, then configs/kimi_k2_anneal.py (400 B tokens at 4K), then configs/kimi_k2_long.py (60 B tokens at
32K with YaRN). Each number below is marked [report] (Kimi K2 technical report, arXiv 2507.20534, §2.5 / §3) or
[ours] (a choice the report does not make for us).

Rope: the weights' config keeps the released rope_scaling (YaRN factor 32, original context 4096), but at
seq_len 4096 `rope_scaling="auto"` leaves YaRN off (DeepSeek-V3's rule): plain RoPE, softmax scale 192^-0.5, so
qk-clip's τ = 100 means what the report means.
"""

import math

from kimi_jax.train_config import base_config

# The recipe in tokens [report]; steps follow from the global batch.
GLOBAL_BATCH_TOKENS = 67_108_864  # "67M tokens" per step = 2^26 [report]
PRETRAIN_CONSTANT_TOKENS = 10e12  # 2e-4 held for the first 10 T tokens (warm-up included) [report]
PRETRAIN_DECAY_TOKENS = 5.5e12  # then cosine 2e-4 -> 2e-5 over 5.5 T tokens [report]
ANNEAL_TOKENS = 400e9  # anneal at 4K [report]
LONG_CONTEXT_TOKENS = 60e9  # long-context activation at 32K [report]
ANNEAL_LR = (2e-5, 7e-6)  # over the anneal and the long-context stage together [report]; linear in steps [ours]


def steps_for(tokens: float) -> int:
  """Optimizer steps that consume `tokens` at the 67 M-token batch (rounded up)."""
  return math.ceil(tokens / GLOBAL_BATCH_TOKENS)


def anneal_lr_at(fraction: float) -> float:
  """The anneal's learning rate after `fraction` of its 460 B tokens (linear from 2e-5 to 7e-6) [ours: shape]."""
  start, end = ANNEAL_LR
  return start + (end - start) * fraction


def get_config():
  c = base_config("kimi_k2")
  c.model.update(
    moe_impl="auto",
    attention_impl="auto",  # auto: the Pallas kernels on TPU
    remat="full",  # [ours] activations recomputed per layer
    moe_capacity_factor=2.0,
  )  # [ours] bounded expert-parallel buffers; drops are logged
  c.mesh = "fsdp=8,expert=64"  # [ours] 512 chips (v5p-1024): 6 experts per chip, params sharded 512 ways
  c.seq_len = 4096  # [report]
  c.rope_scaling = "auto"  # plain RoPE at 4K [report]; YaRN comes with the long-context stage
  c.batch_size = GLOBAL_BATCH_TOKENS // c.seq_len  # 16,384 sequences [report: 67 M tokens]
  c.microbatches = 16  # [ours] 1,024 sequences (2 per chip) per forward/backward; see the README's AOT table
  c.loss_chunk = 0  # [ours] whole-sequence logits: at 2 × 4096 positions per chip, 2048-position pieces raised the
  #                   compiled peak (86.4 vs 83.7 GiB per chip)
  c.optimizer = "muon_clip"  # [report]
  c.qk_clip_tau = 100.0  # [report]
  c.weight_decay = 0.1  # [report]
  c.learning_rate = 2e-4  # [report]
  c.schedule = "wsd"  # warm-up, constant, cosine [report]
  c.warmup_steps = 500  # [report]
  c.decay_steps = steps_for(PRETRAIN_DECAY_TOKENS)  # 81,957 steps = 5.5 T tokens [report]
  c.steps = steps_for(PRETRAIN_CONSTANT_TOKENS) + c.decay_steps  # 230,969 steps = 15.5 T tokens [report]
  c.final_learning_rate_ratio = 0.1  # 2e-4 -> 2e-5 [report]
  c.adam_b1, c.adam_b2 = 0.9, 0.95  # AdamW on embeddings, head, norms [ours: the Muon paper's values]
  c.sample_tokens = 0
  c.checkpoint_every = 1000  # [ours]
  return c
