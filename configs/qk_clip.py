"""The qk-clip demonstration run (benchmarks/qk_clip.py): a small K2-shaped MLA model, MuonClip at an aggressive
learning rate, a τ scaled down to this model.

    python -m kimi_jax.train --config configs/qk_clip.py --workdir runs/qk_clip [--config.qk_clip_tau=30]

(Plain Muon is `qk_clip_tau = None`, which benchmarks/qk_clip.py sets in Python: the flag parser cannot turn the
string None into a float field.)

Model: the tiny preset cut to 2 layers (1 dense + 1 MoE; MLA with 4 heads, q/kv latent 64/32, nope/rope/v
32/16/32, YaRN softmax scale as K2), float32 compute. Batch 16×64 byte tokens. lr 3e-2 (10× the tiny demo's,
150× K2's 2e-4), 20 warm-up steps then constant (wsd with no decay), so nothing but the clip restrains the
attention logits. τ = 20: K2's τ = 100 is for a 64-head, 192-dim-head model trained for 15.5 T tokens; at this
scale plain Muon's max logit climbs to ~100-120 over 200 steps and crosses 20 around step 50, leaving three
quarters of the run to show the difference.
"""

from kimi_jax.train_config import base_config


def get_config():
  c = base_config("tiny")
  c.model.update(num_hidden_layers=2, first_k_dense_replace=1, dtype="float32")
  c.rope_scaling = "yarn"  # K2's released softmax scale (0.1309 at K2's head dims), as docs/qk_clip.md measured
  c.optimizer = "muon_clip"
  c.qk_clip_tau = 20.0
  c.learning_rate = 3e-2
  c.schedule = "wsd"
  c.warmup_steps = 20
  c.decay_steps = 0  # constant after warm-up
  c.steps = 200
  c.batch_size = 16
  c.seq_len = 64
  c.log_every = 1
  c.checkpoint_every = 1_000_000  # only the final step is saved
  c.keep_checkpoints = 1
  c.sample_tokens = 0
  c.router_bias_update_rate = 1e-2  # as configs/tiny.py: a short run
  return c
