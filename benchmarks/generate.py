"""Generation throughput as two tables: ours against transformers' `generate()` on the same weights, and the MLA
latent cache against an expanded per-head K/V cache.

    python benchmarks/generate.py                          # both tables, 2 threads
    python benchmarks/generate.py --tables transformers --repeats 5
    python benchmarks/generate.py --tables cache --batch 4 --lengths 1024,4096 --dtype bfloat16 --steps 32

Table "transformers": the 3-layer tiny_hf fixture (tests/reference/data/tiny_hf) in float32, greedy, no stop
token, --new_tokens (256) new tokens after random prompts of 8 and 512 tokens, batches of 1 and 8 (all rows of a
batch the same length, so transformers needs no padding). Ours is `kimi_jax.generate.generate()`; theirs is
`DeepseekV3ForCausalLM.generate()` (default attention and experts implementations, KV cache on), run in a
subprocess of --reference_python (default: this interpreter if it imports transformers, else /work/refenv/bin/python
if present; the rows are skipped with a note when there is none). Both sides are timed end to end (prefill and
decode) after one warm-up call, best of --repeats calls, ours and theirs alternating so that both see the same load;
tokens/s = batch · new tokens / seconds. The last column says whether the greedy tokens are identical.
Threads (--threads, 2): this process pins itself to the first N CPUs (`os.sched_setaffinity`) before jax starts
its CPU client, whose thread pool takes its size from the CPUs it may use; the transformers subprocess inherits
that affinity and calls `torch.set_num_threads(N)` and `torch.set_num_interop_threads(N)`.

Table "cache":

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
import json
import os
from pathlib import Path
import statistics
import subprocess
import sys
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
REPO = Path(__file__).resolve().parents[1]
TINY_HF = REPO / "tests" / "reference" / "data" / "tiny_hf"
REFENV_PYTHON = Path("/work/refenv/bin/python")


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


def cache_table(args) -> None:
  """Latent vs expanded cache: one decode step at a time (`decode_step`), K2's attention dims, random weights."""
  cfg = k2_attention_config(args.heads, args.layers, args.dtype)
  model = random_model(cfg)
  itemsize = jnp.dtype(args.dtype).itemsize
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


# Ours against transformers ------------------------------------------------------------------------------------

# Runs in --reference_python, answering JSON lines: the first line {"checkpoint", "threads"} loads the model and
# answers {"versions"}; each further line {"prompts", "new_tokens"} runs one greedy generate() and answers
# {"seconds", "tokens"}.
_TRANSFORMERS_WORKER = r"""
import json, sys, time
import torch, transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

job = json.loads(sys.stdin.readline())
torch.set_num_threads(job["threads"])
torch.set_num_interop_threads(job["threads"])
# The release's model_type "kimi_k2" has no per-expert -> fused conversion mapping (tests/reference/make_fixture.py).
register_checkpoint_conversion_mapping("kimi_k2", get_checkpoint_conversion_mapping("deepseek_v3"))
cfg = DeepseekV3Config.from_pretrained(job["checkpoint"])
model, info = DeepseekV3ForCausalLM.from_pretrained(
  job["checkpoint"], config=cfg, dtype=torch.float32, output_loading_info=True
)
bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
assert not bad, bad
model.eval()
model.generation_config.eos_token_id = None  # no stop token: every run makes new_tokens tokens
print(json.dumps({"versions": f"transformers {transformers.__version__}, torch {torch.__version__}"}), flush=True)
for line in sys.stdin:
  run = json.loads(line)
  prompts = torch.tensor(run["prompts"])
  with torch.no_grad():
    start = time.perf_counter()
    out = model.generate(prompts, max_new_tokens=run["new_tokens"], do_sample=False, use_cache=True, pad_token_id=0)
    seconds = time.perf_counter() - start
  print(json.dumps({"seconds": seconds, "tokens": out[:, prompts.shape[1]:].tolist()}), flush=True)
"""


def default_reference_python() -> str | None:
  """This interpreter if it imports transformers and torch, else /work/refenv/bin/python if present, else None."""
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    return sys.executable
  except ImportError:
    return str(REFENV_PYTHON) if REFENV_PYTHON.exists() else None


class TransformersWorker:
  """transformers' DeepseekV3ForCausalLM on the fixture, in a subprocess of `python` (`_TRANSFORMERS_WORKER`)."""

  def __init__(self, python: str, threads: int):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    self.proc = subprocess.Popen(
      [python, "-c", _TRANSFORMERS_WORKER],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )
    self.versions = self._ask({"checkpoint": str(TINY_HF), "threads": threads})["versions"]

  def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """(seconds, new tokens [B][N]) of one greedy generate()."""
    out = self._ask({"prompts": prompts, "new_tokens": new_tokens})
    return out["seconds"], out["tokens"]

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()

  def _ask(self, message: dict) -> dict:
    self.proc.stdin.write(json.dumps(message) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"transformers worker failed:\n{self.proc.stderr.read()[-4000:]}")
    return json.loads(line)


def ours(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
  """(seconds, new tokens [B][N]) of one greedy `generate()`."""
  start = time.perf_counter()
  out = gen.generate(model, prompts, max_new_tokens=new_tokens)
  return time.perf_counter() - start, out


def transformers_table(args) -> None:
  """Ours against transformers' generate() on the tiny_hf fixture, float32, greedy (module docstring)."""
  from kimi_jax.checkpoint.hf import HFCheckpoint, load_state

  python = args.reference_python or default_reference_python()
  if python is None:
    print("transformers rows skipped: no Python with torch + transformers (pass --reference_python)\n")
    return
  ckpt = HFCheckpoint(TINY_HF)
  cfg = ckpt.config(dtype="float32", param_dtype="float32")
  model = nnx.eval_shape(lambda: KimiK2(cfg, rngs=nnx.Rngs(0)))
  nnx.update(model, jax.tree.map(jnp.asarray, load_state(ckpt, cfg)))
  rng = np.random.default_rng(0)
  try:
    worker = TransformersWorker(python, args.threads)
  except (OSError, RuntimeError) as e:
    print(f"transformers rows skipped: {e}\n")
    return
  print(
    f"model: tiny_hf fixture (3 layers), float32, greedy, {args.new_tokens} new tokens; {worker.versions} "
    f"({python}); generate() end to end, best of {args.repeats} interleaved calls after a warm-up\n"
  )
  print(f"{'batch':>5} {'prompt':>6} {'ours tok/s':>11} {'transformers tok/s':>19} {'ratio':>7} {'same tokens':>12}")
  for s in (int(x) for x in args.prompt_lengths.split(",")):
    for b in (1, 8):
      prompts = rng.integers(3, cfg.vocab_size, (b, s)).tolist()
      ours(model, prompts, args.new_tokens), worker.generate(prompts, args.new_tokens)  # warm-up (and compile)
      times = [[], []]
      for _ in range(args.repeats):  # interleaved, so both sides see the same load
        seconds, our_tokens = ours(model, prompts, args.new_tokens)
        times[0].append(seconds)
        seconds, their_tokens = worker.generate(prompts, args.new_tokens)
        times[1].append(seconds)
      ours_rate, their_rate = (b * args.new_tokens / min(t) for t in times)
      print(
        f"{b:>5} {s:>6} {ours_rate:>11.0f} {their_rate:>19.0f} {ours_rate / their_rate:>6.2f}x "
        f"{'yes' if our_tokens == their_tokens else 'NO':>12}",
        flush=True,
      )
  worker.close()
  print()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tables", default="transformers,cache", help="which tables: transformers, cache")
  parser.add_argument("--threads", type=int, default=2, help="CPUs for each side (0: all)")
  parser.add_argument("--reference_python", default=None, help="a Python with torch + transformers")
  parser.add_argument("--prompt_lengths", default="8,512", help="transformers table: prompt lengths")
  parser.add_argument("--new_tokens", type=int, default=256, help="transformers table: new tokens per row")
  parser.add_argument("--repeats", type=int, default=3, help="transformers table: timed calls per row (best)")
  parser.add_argument("--heads", type=int, default=32, help="cache table")
  parser.add_argument("--layers", type=int, default=2, help="cache table")
  parser.add_argument("--batch", type=int, default=2, help="cache table")
  parser.add_argument("--lengths", default="512,2048,8192", help="cache table: cache lengths T, comma-separated")
  parser.add_argument("--steps", type=int, default=16, help="cache table")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="cache table")
  args = parser.parse_args()
  if args.threads:  # before jax's CPU client exists: its thread pool is sized by the CPUs this process may use
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
  threads = len(os.sched_getaffinity(0))
  print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, {threads} CPUs")
  tables = args.tables.split(",")
  if "transformers" in tables:
    transformers_table(args)
  if "cache" in tables:
    cache_table(args)


if __name__ == "__main__":
  main()
