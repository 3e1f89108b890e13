"""Kimi K2 (1.03 T parameters) pretraining on a TPU v5p pod with MuonClip, K2's published recipe.

    python -m kimi_jax.tools.aot --config configs/kimi_k2.py --topology v5p:8x8x8   # does it fit? (CPU host)
    python -m kimi_jax.train --config configs/kimi_k2.py --workdir gs://BUCKET/run     # on the pod

Global batch 1024 × 4096 = 4.2 M tokens (K2 used 67 M); 500 warm-up steps, 2e-4, cosine to 2e-5 (WSD).
"""

from kimi_jax.train_config import base_config


def get_config():
  c = base_config("kimi_k2")
  c.model.update(moe_impl="auto", attention_impl="auto", remat="full",  # auto: the Pallas kernels on TPU
                 moe_capacity_factor=2.0)  # bounded expert-parallel buffers; drops are logged
  c.mesh = "fsdp=8,expert=64"  # 512 chips (v5p-1024): 6 experts per chip, params sharded 512 ways
  c.batch_size = 1024
  c.seq_len = 4096
  c.microbatches = 1
  c.optimizer = "muon_clip"
  c.learning_rate = 2e-4
  c.schedule = "wsd"
  c.warmup_steps = 500
  c.decay_steps = 100_000
  c.steps = 3_700_000  # 15.5 T tokens at 4.2 M tokens per step
  c.qk_clip_tau = 100.0
  c.sample_tokens = 0
  c.checkpoint_every = 1000
  return c
