"""The embedded default: a K2-shaped tiny model on the byte-level corpus; trains on a laptop CPU in minutes.

python -m kimi_jax.train --config configs/tiny.py --workdir runs/demo [--config.steps=100 ...]
"""

from kimi_jax.train_config import base_config


def get_config():
  c = base_config("tiny")
  c.steps = 300
  c.batch_size = 16
  c.seq_len = 128
  c.learning_rate = 3e-3
  c.warmup_steps = 50
  c.log_every = 20
  c.checkpoint_every = 100
  c.eval_every = 100  # the held-out loss at steps 100, 200, 300
  c.eval_split = 0.02  # every 50th chapter of the corpus, never trained on
  c.router_bias_update_rate = 1e-2  # a short run: let the balancing act within it
  return c
