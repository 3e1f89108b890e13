"""Synthetic checkpoints in the released Kimi K2 layouts (BF16, FP8 as Kimi-K2-Instruct, INT4 as -Thinking), of
any size, written by streaming random bytes — no torch, no model in memory. For measuring conversion speed and
memory (benchmarks/convert.py, tests/checkpoint/test_convert_memory.py) and as a stand-in release
(tests/gcs/test_walkthrough_gcs.py); the values are random but finite. Test data, not library code: it lives with
the tests.

    python tests/builders/synthetic.py --out_dir /tmp/k2_synth --gb 3 --format fp8
"""

from __future__ import annotations

from collections.abc import Iterator
import math

import ml_dtypes
import numpy as np

from kimi_jax.checkpoint import quant
from kimi_jax.checkpoint.hf import TensorMap, abstract_state, flatten, tensor_map
from kimi_jax.checkpoint.hf_write import write_release
from kimi_jax.checkpoint.safetensors import TensorSpec
from kimi_jax.config import ModelConfig

FORMATS = ("bf16", "fp8", "int4")
_BLOCK_BYTES = 32 << 20  # random bytes are produced in blocks of this size


def k2_shaped(experts_gb: float, fmt: str = "fp8") -> ModelConfig:
  """A K2-shaped config (hidden 2048, 64 experts of width 1024, top-8, 1 dense layer) whose routed experts take
  about `experts_gb` GB in `fmt`; each MoE layer's stacked expert kernel is 0.4 G parameters."""
  bytes_per_param = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5625}[fmt]
  moe_layers = max(1, round(experts_gb * 1e9 / (3 * 64 * 2048 * 1024 * bytes_per_param)))
  return ModelConfig(
    vocab_size=32768,
    hidden_size=2048,
    num_hidden_layers=moe_layers + 1,
    first_k_dense_replace=1,
    intermediate_size=8192,
    moe_intermediate_size=1024,
    n_routed_experts=64,
    num_experts_per_tok=8,
    n_shared_experts=1,
    routed_scaling_factor=2.827,
    num_attention_heads=16,
    q_lora_rank=768,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    rope_theta=50000.0,
    rope_factor=32.0,
    rope_beta_fast=1.0,
    rope_beta_slow=1.0,
    rope_mscale=1.0,
    rope_mscale_all_dim=1.0,
    max_position_embeddings=131072,
  )


def write_synthetic(
  directory: str, cfg: ModelConfig, fmt: str = "fp8", *, max_shard_bytes: int = 4 << 30, workers: int = 4, seed: int = 0
) -> int:
  """Write a random checkpoint for `cfg` in `fmt` (see FORMATS). Returns the bytes of tensor data written."""
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r} not in {FORMATS}")
  leaves = flatten(abstract_state(cfg))
  groups = [
    _specs(entry, entry.hf_shape(tuple(leaves[entry.path].shape)), fmt, seed + i)
    for i, entry in enumerate(tensor_map(cfg))
  ]
  hf_config = cfg.to_hf()
  if fmt == "fp8":
    hf_config["quantization_config"] = quant.Fp8Scheme().hf_config()
  elif fmt == "int4":
    hf_config["quantization_config"] = {
      "quant_method": "compressed-tensors",
      "format": "pack-quantized",
      "config_groups": {
        "group_0": {
          "targets": ["Linear"],
          "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
        }
      },
      "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    }
  total, _ = write_release(directory, groups, hf_config, max_shard_bytes=max_shard_bytes, workers=workers)
  return total


def _specs(entry: TensorMap, shape: tuple[int, ...], fmt: str, seed: int) -> list[TensorSpec]:
  name = entry.hf_name
  if entry.path[-1] == "bias":
    return [TensorSpec(name, np.float32, shape, lambda: iter([_small_positive(shape, seed, np.float32)]))]
  if fmt == "int4" and entry.path[-2] == "experts":
    r, c = shape
    return [
      TensorSpec(name + "_packed", np.int32, (r, c // 8), lambda: _random(np.int32, (r, c // 8), seed, 0)),
      TensorSpec(
        name + "_scale",
        ml_dtypes.bfloat16,
        (r, c // 32),
        lambda: iter([_small_positive((r, c // 32), seed, ml_dtypes.bfloat16)]),
      ),
      TensorSpec(name + "_shape", np.int32, (2,), lambda: iter([np.array([r, c], np.int32)])),
    ]
  if fmt == "fp8" and entry.fp8_exportable:
    scale_shape = quant.Fp8Scheme().scale_shape(shape)
    # Clearing the exponent's top bit keeps e4m3 values below 2, away from NaN (all ones).
    return [
      TensorSpec(name, quant.FP8_DTYPE, shape, lambda: _random(quant.FP8_DTYPE, shape, seed, 0xBF)),
      TensorSpec(
        name + quant.FP8_SCALE_SUFFIX,
        np.float32,
        scale_shape,
        lambda: iter([_small_positive(scale_shape, seed, np.float32)]),
      ),
    ]
  dtype = np.dtype(ml_dtypes.bfloat16)  # clearing bit 14 keeps bf16 values below 2, away from inf/NaN
  return [TensorSpec(name, dtype, shape, lambda: _random(dtype, shape, seed, 0xBFFF))]


def _random(dtype: np.dtype, shape: tuple[int, ...], seed: int, mask: int) -> Iterator[np.ndarray]:
  """Random bits in row blocks of about _BLOCK_BYTES; `mask` (if non-zero) is and-ed into each element's bits."""
  dtype = np.dtype(dtype)
  rng = np.random.default_rng(seed)
  row_bytes = math.prod(shape[1:]) * dtype.itemsize
  rows = max(1, _BLOCK_BYTES // max(row_bytes, 1))
  bits = np.dtype(f"u{dtype.itemsize}")
  for r in range(0, shape[0], rows):
    n = min(rows, shape[0] - r)
    block = np.frombuffer(rng.bytes(n * row_bytes), bits).copy()
    if mask:
      block &= np.array(mask, bits)
    yield block.view(dtype).reshape((n,) + tuple(shape[1:]))


def _small_positive(shape: tuple[int, ...], seed: int, dtype) -> np.ndarray:
  return np.random.default_rng(seed).uniform(1e-3, 2e-3, shape).astype(dtype)


def main(argv):
  from absl import flags

  f = flags.FLAGS
  cfg = k2_shaped(f.gb, f.format)
  total = write_synthetic(f.out_dir, cfg, f.format, workers=f.workers)
  print(f"wrote {total / 1e9:.2f} GB ({f.format}, {cfg.num_hidden_layers} layers) to {f.out_dir}")


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("out_dir", None, "Output directory.", required=True)
  flags.DEFINE_float("gb", 3.0, "Approximate size of the routed experts in GB.")
  flags.DEFINE_enum("format", "fp8", list(FORMATS), "Release format.")
  flags.DEFINE_integer("workers", 4, "Shards written in parallel.")
  app.run(main)
