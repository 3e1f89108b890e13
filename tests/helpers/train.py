"""A small training run (the tiny model shrunk further, 4 experts, 32-token sequences) and its metrics: shared by
tests/train and tests/gcs."""

import json
import os
import sys

from helpers.paths import TESTS
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


def small_config_file(path, steps, **updates):
  """A config file at `path` whose get_config() is `small_config(steps)` with `updates`: what a CLI run under test
  reads (`python -m kimi_jax.train --config path`). Returns `path`."""
  path.write_text(
    f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
    "from helpers.train import small_config\n\n\n"
    f"def get_config():\n  c = small_config({steps})\n  c.update(**{updates!r})\n  return c\n"
  )
  return path


def train_command(config, workdir):
  return [sys.executable, "-m", "kimi_jax.train", "--config", str(config), "--workdir", str(workdir)]


def child_env(compilation_cache):
  """The environment of a trainer started by a test: CPU, float32 matmuls as tests/conftest.py sets, and the same
  persistent compilation cache as this process (the `compilation_cache` fixture's variables)."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest", **compilation_cache}
