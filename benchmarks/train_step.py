"""Train-step throughput: tokens/s and model FLOPs per token, per config and MoE implementation.

    python benchmarks/train_step.py [--configs tiny,proxy,bench_tiny] [--impls dense,ragged,blocked] [--steps 8]

Times the real jit-compiled train step (AdamW, the config's batch) on random tokens after one compile step;
reports the median step time of the rest. On XLA:CPU `jax.lax.ragged_dot` is a dense masked product over all
E groups, so `ragged` there costs more than `dense`; `blocked` is the exact-FLOPs path for CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from kimi_jax.data.batch import Batch
from kimi_jax.model_stats import count_params, train_flops_per_token
from kimi_jax.sharding import make_mesh
from kimi_jax.train_config import load_run_config, model_config
from kimi_jax.training.optimizer import build_optimizer
from kimi_jax.training.state import init_train_state
from kimi_jax.training.step import make_train_step

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
MAXTEXT_BENCH_TINY_TOKENS_PER_SEC = 1160  # MaxText 0.2.5, same shape, same 2-core CPU (issue 2)


def time_train_step(c, steps: int) -> list[float]:
  cfg = model_config(c)
  tx = build_optimizer(c, cfg)
  mesh = make_mesh(c.mesh)
  graphdef, state = init_train_state(c, cfg, tx, mesh)
  step = make_train_step(graphdef, tx, c, state.shardings())
  rng = np.random.default_rng(0)
  shape = (c.batch_size, c.seq_len)
  batch = Batch.unpacked(
    rng.integers(0, cfg.vocab_size, shape, dtype=np.int32), rng.integers(0, cfg.vocab_size, shape, dtype=np.int32)
  )
  times = []
  for _ in range(steps + 1):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - start)
  return times[1:]  # drop the compile step


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="tiny,proxy,bench_tiny")
  parser.add_argument("--impls", default="dense,ragged,blocked")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--dtype", default=None, help="override compute dtype (float32|bfloat16)")
  parser.add_argument("--optimizer", default=None, help="override the optimizer (adamw|muon_clip)")
  args = parser.parse_args()
  rows = []
  for name in args.configs.split(","):
    for impl in args.impls.split(","):
      c = load_run_config(os.path.join(CONFIG_DIR, f"{name}.py"))
      c.model.moe_impl = impl
      if args.dtype:
        c.model.dtype = args.dtype
      if args.optimizer:
        c.optimizer = args.optimizer
      cfg = model_config(c)
      times = time_train_step(c, args.steps)
      med = statistics.median(times)
      tokens = c.batch_size * c.seq_len
      flops = train_flops_per_token(cfg, c.seq_len)
      rows.append(
        (
          name,
          impl,
          cfg.dtype,
          f"{count_params(cfg)['total_params'] / 1e6:.1f}M",
          f"{c.batch_size}x{c.seq_len}",
          f"{med:.3f}",
          f"{tokens / med:,.0f}",
          f"{flops / 1e6:.1f}M",
          f"{flops * tokens / med / 1e9:.1f}",
        )
      )
      print(" | ".join(rows[-1]), flush=True)
  header = (
    "config",
    "moe_impl",
    "dtype",
    "params",
    "batch",
    "s/step (median)",
    "tokens/s",
    "FLOPs/token",
    "model GFLOP/s",
  )
  print(f"\n{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in rows:
    print("| " + " | ".join(row) + " |")
  if any(r[0] == "bench_tiny" for r in rows):
    best = max(float(r[6].replace(",", "")) for r in rows if r[0] == "bench_tiny")
    print(
      f"\nbench_tiny best: {best:,.0f} tokens/s vs MaxText 0.2.5 {MAXTEXT_BENCH_TINY_TOKENS_PER_SEC:,} "
      f"({best / MAXTEXT_BENCH_TINY_TOKENS_PER_SEC:.2f}x; target >= 1.25x)"
    )


if __name__ == "__main__":
  main()
