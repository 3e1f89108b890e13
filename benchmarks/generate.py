"""Decode throughput with the MLA latent cache vs an expanded per-head K/V cache, as a table.

    python benchmarks/generate.py                          # K2-shaped attention, 2 layers, CPU-sized
    python benchmarks/generate.py --batch 4 --lengths 1024,4096 --dtype bfloat16 --steps 32

Model: Kimi K2's attention dimensions (kv_lora_rank 512, rope 64, nope 128, value 128, q_lora 1536) with
--heads heads (K2: 64), a small hidden size and MoE, --layers layers, random weights. Each row prefills a
16-token prompt into a cache of length T, then times --steps jit-compiled decode steps (after one warm-up
step). Columns: cache kind; T; values cached per token per layer; cache size for the whole batch; median
ms per step; tokens/s = batch / step time. The XLA decode attention reads all T cached positions every step
(masking those past each row's length), so the cost follows T; the Pallas kernel (TPU/GPU) skips them.
Letters: B batch, T cache length, H heads, L layers.
"""

from __future__ import annotations

import argparse
import statistics
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax import generate as gen
from kimi_jax.config import ModelConfig, kimi_k2
from kimi_jax.layers.cache import CACHE_KINDS
from kimi_jax.model import KimiK2

PROMPT = 16


def k2_attention_config(heads: int, layers: int, dtype: str) -> ModelConfig:
  """K2's MLA dimensions and YaRN, with a small hidden size, vocab and MoE so it fits a CPU."""
  return kimi_k2(dtype=dtype, param_dtype=dtype).replace(
    vocab_size=4096,
    hidden_size=1024,
    num_hidden_layers=layers,
    intermediate_size=2048,
    moe_intermediate_size=256,
    n_routed_experts=8,
    num_experts_per_tok=2,
    num_attention_heads=heads,
  )


def random_model(cfg: ModelConfig) -> KimiK2:
  """Random weights without the cost of eager initialisation: N(0, 0.02), norms 1, router bias 0."""
  model = nnx.eval_shape(lambda: KimiK2(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Variable).to_pure_dict()
  leaves, treedef = jax.tree.flatten_with_path(state)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  values = [
    jnp.ones(a.shape, a.dtype)
    if path[-1].key == "scale"
    else jnp.zeros(a.shape, a.dtype)
    if path[-1].key == "bias"
    else (0.02 * jax.random.normal(k, a.shape)).astype(a.dtype)
    for (path, a), k in zip(leaves, keys)
  ]
  nnx.update(model, jax.tree.unflatten(treedef, values))
  return model


def time_decode(model: KimiK2, batch: int, max_len: int, kind: str, steps: int) -> float:
  """Median seconds per decode step for `batch` rows with a cache of length `max_len`."""
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, model.cfg.vocab_size, (batch, PROMPT), dtype=np.int32)
  logits, state = gen.prefill(model, prompts, np.full((batch,), PROMPT, np.int32), max_len=max_len, kind=kind)
  tokens = jnp.argmax(logits, -1).astype(jnp.int32)
  times = []
  for _ in range(steps + 1):  # the first step compiles
    start = time.perf_counter()
    logits, state = gen.decode_step(model, state, tokens, impl="xla")
    tokens = jnp.argmax(logits, -1).astype(jnp.int32)
    tokens.block_until_ready()
    times.append(time.perf_counter() - start)
  return statistics.median(times[1:])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--lengths", default="512,2048,8192", help="cache lengths T, comma-separated")
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  args = parser.parse_args()

  cfg = k2_attention_config(args.heads, args.layers, args.dtype)
  model = random_model(cfg)
  itemsize = jnp.dtype(args.dtype).itemsize
  print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
  print(
    f"model: K2 attention dims, H={cfg.num_attention_heads}, L={cfg.num_hidden_layers}, D={cfg.hidden_size}, "
    f"{args.dtype}; B={args.batch}; decode attention impl xla\n"
  )
  print(
    f"{'cache':<9} {'T':>6} {'values/tok/layer':>16} {'cache MB':>9} {'ms/step':>8} {'tokens/s':>9} {'vs latent':>9}"
  )
  for max_len in (int(t) for t in args.lengths.split(",")):
    latent_rate = None
    for kind in CACHE_KINDS:
      shapes = jax.eval_shape(lambda max_len=max_len, kind=kind: gen.init_cache(cfg, args.batch, max_len, kind))
      values = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
      per_token = values // (cfg.num_hidden_layers * args.batch * max_len)
      rate = args.batch / time_decode(model, args.batch, max_len, kind, args.steps)
      latent_rate = latent_rate or rate
      print(
        f"{kind:<9} {max_len:>6} {per_token:>16} {values * itemsize / 2**20:>9.1f} "
        f"{1e3 * args.batch / rate:>8.2f} {rate:>9.1f} {rate / latent_rate:>8.2f}x"
      )


if __name__ == "__main__":
  main()
