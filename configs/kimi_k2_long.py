"""Kimi K2 stage 3: long-context activation, 60 B tokens at 32K with YaRN (factor 32 over the original 4K).

    python -m kimi_jax.train --config configs/kimi_k2_long.py --workdir gs://BUCKET/k2-long \\
        --config.init_from=gs://BUCKET/k2-anneal   # stage 2's workdir

Everything not set here is stage 1's (configs/kimi_k2.py). At seq_len 32,768 > 4,096 `rope_scaling="auto"` turns
the weights' YaRN on: frequencies 20-31 divided by 32, softmax scale 192^-0.5 · (0.1 ln 32 + 1)² = 0.1309 — the
numerics of the released model, which transformers applies at any length. The learning rate continues the
anneal's linear decay to 7e-6 (configs/kimi_k2_anneal.py) [report: 2e-5 -> 7e-6; ours: linear, split by steps].
The report then extends the context to 128K with YaRN.
"""

import os

from ml_collections import config_dict

from kimi_jax.train_config import load_config_module

_here = os.path.dirname(__file__)
k2 = load_config_module(os.path.join(_here, "kimi_k2.py"))
anneal = load_config_module(os.path.join(_here, "kimi_k2_anneal.py"))


def get_config():
  c = k2.get_config()
  c.init_from = config_dict.placeholder(str)  # required: stage 2's workdir or model checkpoint
  c.seq_len = 32_768  # [report]
  c.batch_size = k2.GLOBAL_BATCH_TOKENS // c.seq_len  # 2,048 sequences: still 67 M tokens [report]
  c.microbatches = 4  # [ours] 512 sequences (1 per chip) per forward/backward
  c.loss_chunk = 4096  # [ours] f32 logits for 4096 positions per chip at a time (2.7 GB), not 32,768 (21 GB)
  c.model.moe_seq_chunk = 4096  # [ours] expert dispatch buffers for 4096 positions at a time (~7 GiB each at 32K)
  c.steps = k2.steps_for(k2.LONG_CONTEXT_TOKENS)  # 895 steps = 60 B tokens [report]
  c.schedule = "linear"  # [ours]
  c.warmup_steps = 0  # [ours]
  c.learning_rate = k2.anneal_lr_at(anneal.anneal_fraction())  # 8.70e-6, where the anneal stage ended [ours]
  c.final_learning_rate_ratio = k2.ANNEAL_LR[1] / c.learning_rate  # ends at 7e-6 [report]
  return c
