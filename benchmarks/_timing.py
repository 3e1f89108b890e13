"""Shared timing for the benchmark scripts (run as `python benchmarks/NAME.py`, so this imports as `_timing`)."""

import statistics
import time

import jax


def time_ms(fn, args, iters: int) -> float:
  """Median wall time of `fn(*args)` in milliseconds over `iters` runs, after one compile + warm-up run."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)
