"""Kimi K2 stage 2: the anneal, 400 B tokens at 4K (plain RoPE), learning rate 2e-5 falling towards 7e-6.

    python -m kimi_jax.train --config configs/kimi_k2_anneal.py --workdir gs://BUCKET/k2-anneal \\
        --config.init_from=gs://BUCKET/k2        # stage 1's workdir (its latest checkpoint)

Everything not set here is stage 1's (configs/kimi_k2.py, where the recipe's numbers live). The report
[arXiv 2507.20534 §2.5] anneals 2e-5 -> 7e-6 over this stage and the long-context one together; we make that one
linear decay in steps over their 460 B tokens [ours], so this stage ends where configs/kimi_k2_long.py begins.
Params and router biases come from stage 1; the optimizer state (Muon momentum, AdamW moments) starts afresh
[ours: init_from reads the model state only].
"""

import os

from ml_collections import config_dict

from kimi_jax.train_config import load_config_module

k2 = load_config_module(os.path.join(os.path.dirname(__file__), "kimi_k2.py"))


def anneal_fraction() -> float:
  """The share of the anneal's steps (this stage + the long-context stage) that this stage takes."""
  mine, long = k2.steps_for(k2.ANNEAL_TOKENS), k2.steps_for(k2.LONG_CONTEXT_TOKENS)
  return mine / (mine + long)


def get_config():
  c = k2.get_config()
  c.init_from = config_dict.placeholder(str)  # required: stage 1's workdir or model checkpoint
  c.steps = k2.steps_for(k2.ANNEAL_TOKENS)  # 5,961 steps = 400 B tokens [report]
  c.schedule = "linear"  # [ours]
  c.warmup_steps = 0  # [ours] continuing from a trained model
  c.learning_rate = k2.ANNEAL_LR[0]  # 2e-5 [report]
  c.final_learning_rate_ratio = k2.anneal_lr_at(anneal_fraction()) / c.learning_rate  # ends at 8.70e-6 [ours]
  return c
