"""Hugging Face Kimi K2 / DeepSeek-V3 checkpoints: the name mapping and tensor-by-tensor reading and writing.

Our tree holds stacked kernels [L, (E,) in, out]; the release holds one [out, in] tensor per layer (and per
expert). `tensor_map(cfg)` lists every HF tensor with the slice of our tree it fills, so loading, writing and
(later) streaming conversion are loops over the same list. RoPE rows keep the checkpoint's interleaved layout
(the model rotates pairs in place), so no row permutation happens either way.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import numpy as np

from kimi_jax.checkpoint.safetensors import SafetensorsFile, write
from kimi_jax.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
  """A checkpoint that does not match its config or is malformed; the message names the tensor and file."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
  hf_name: str
  path: tuple[str, ...]  # leaf in our tree, e.g. ("moe_layers", "mlp", "experts", "gate")
  index: tuple[int, ...]  # leading (layer,) or (layer, expert) of the stacked leaf; () for unstacked
  transpose: bool  # HF linear weights are [out, in]; our kernels [in, out]


def tensor_map(cfg: ModelConfig) -> list[TensorMap]:
  """Every tensor of the released layout, in checkpoint order."""
  out = [TensorMap("model.embed_tokens.weight", ("embed", "embedding"), (), False)]
  attn = [("q_a_proj", "q_a"), ("q_b_proj", "q_b"), ("kv_a_proj_with_mqa", "kv_a"), ("kv_b_proj", "kv_b"),
          ("o_proj", "o")]
  for i in range(cfg.num_hidden_layers):
    moe = i >= cfg.first_k_dense_replace
    group, layer = ("moe_layers", i - cfg.first_k_dense_replace) if moe else ("dense_layers", i)
    pre = f"model.layers.{i}."

    def add(name, path, transpose=True, index=(layer,)):
      out.append(TensorMap(pre + name, (group,) + path, index, transpose))

    add("input_layernorm.weight", ("attn_norm", "scale"), False)
    for hf, ours in attn:
      add(f"self_attn.{hf}.weight", ("attn", ours, "kernel"))
    add("self_attn.q_a_layernorm.weight", ("attn", "q_a_norm", "scale"), False)
    add("self_attn.kv_a_layernorm.weight", ("attn", "kv_a_norm", "scale"), False)
    add("post_attention_layernorm.weight", ("mlp_norm", "scale"), False)
    projections = ("gate", "up", "down")
    if not moe:
      for p in projections:
        add(f"mlp.{p}_proj.weight", ("mlp", p, "kernel"))
      continue
    add("mlp.gate.weight", ("mlp", "router", "kernel"))
    add("mlp.gate.e_score_correction_bias", ("mlp", "router", "bias"), False)
    for e in range(cfg.n_routed_experts):
      for p in projections:
        add(f"mlp.experts.{e}.{p}_proj.weight", ("mlp", "experts", p), index=(layer, e))
    if cfg.n_shared_experts:
      for p in projections:
        add(f"mlp.shared_experts.{p}_proj.weight", ("mlp", "shared", p, "kernel"))
  out.append(TensorMap("model.norm.weight", ("final_norm", "scale"), (), False))
  out.append(TensorMap("lm_head.weight", ("lm_head", "kernel"), (), True))
  return out


class HFCheckpoint:
  """A released-layout directory: config.json + safetensors shards (+ index). Reads one tensor at a time."""

  def __init__(self, directory: str):
    self.directory = directory
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
      raise CheckpointError(f"{directory}: no config.json")
    with open(config_path) as f:
      self.hf_config = json.load(f)
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
      with open(index_path) as f:
        self.weight_map: dict[str, str] = json.load(f)["weight_map"]
    elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
      self.weight_map = {name: SINGLE_FILE for name in SafetensorsFile(os.path.join(directory, SINGLE_FILE)).names()}
    else:
      raise CheckpointError(f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
    self._files: dict[str, SafetensorsFile] = {}

  def config(self, **runtime: Any) -> ModelConfig:
    return ModelConfig.from_hf(self.hf_config, **runtime)

  def _file(self, name: str) -> SafetensorsFile:
    if name not in self.weight_map:
      raise CheckpointError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
    shard = self.weight_map[name]
    if shard not in self._files:
      path = os.path.join(self.directory, shard)
      if not os.path.isfile(path):
        raise CheckpointError(f"{self.directory}: shard {shard} (holding {name!r}) is missing")
      self._files[shard] = SafetensorsFile(path)
    return self._files[shard]

  def read(self, name: str) -> np.ndarray:
    """The tensor as stored (bf16/f32), as a memory-mapped array."""
    quantised = (name + "_scale_inv", name + "_packed")  # FP8 block scales; INT4 compressed-tensors
    if any(q in self.weight_map for q in quantised):
      raise CheckpointError(f"{self.directory}: tensor {name!r} is quantised (FP8 or INT4); dequantisation is "
                            "not supported by this version")
    return self._file(name).get(name)

  def where(self, name: str) -> str:
    return os.path.join(self.directory, self.weight_map.get(name, "?"))


def abstract_state(cfg: ModelConfig) -> dict[str, Any]:
  """Our full model state (params and router biases) as a nested dict of ShapeDtypeStructs."""
  from flax import nnx

  from kimi_jax.tools.plan import abstract_model

  return nnx.state(abstract_model(cfg), nnx.Variable).to_pure_dict()


def load_state(ckpt: HFCheckpoint, cfg: ModelConfig, dtype: np.dtype | None = None) -> dict[str, Any]:
  """Read every tensor into host numpy arrays shaped like `abstract_state(cfg)`.

  Float leaves take `dtype` (default: the config's param_dtype); the router bias stays float32.
  """
  import ml_dtypes

  target = abstract_state(cfg)
  float_dtype = np.dtype(dtype or (ml_dtypes.bfloat16 if cfg.param_dtype == "bfloat16" else np.float32))

  def alloc(path, leaf):
    is_bias = path[-1] == "bias"
    return np.zeros(leaf.shape, np.float32 if is_bias else float_dtype)

  state = _map_leaves(target, alloc)
  for entry in tensor_map(cfg):
    leaf = _get(state, entry.path)
    expected = leaf.shape[len(entry.index):]
    if entry.transpose:
      expected = expected[::-1]
    tensor = ckpt.read(entry.hf_name)
    if tuple(tensor.shape) != tuple(expected):
      raise CheckpointError(f"tensor {entry.hf_name!r} in {ckpt.where(entry.hf_name)} has shape "
                            f"{tuple(tensor.shape)}, but the config needs {tuple(expected)}")
    leaf[entry.index] = (tensor.T if entry.transpose else tensor).astype(leaf.dtype)
  return state


def save_state(state: dict[str, Any], cfg: ModelConfig, directory: str, *, dtype: np.dtype | None = None,
               max_shard_bytes: int = 4 << 30) -> None:
  """Write `state` in the released layout: config.json, shards and index. Weights in `dtype` (default bf16)."""
  import ml_dtypes

  dtype = np.dtype(dtype or ml_dtypes.bfloat16)
  os.makedirs(directory, exist_ok=True)

  def tensors() -> Iterator[tuple[str, np.ndarray]]:
    for entry in tensor_map(cfg):
      value = np.asarray(_get(state, entry.path)[entry.index])
      value = value.T if entry.transpose else value
      yield entry.hf_name, value if entry.path[-1] == "bias" else value.astype(dtype)

  shards: list[list[tuple[str, np.ndarray]]] = [[]]
  size = 0
  for name, value in tensors():
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((name, value))
    size += value.nbytes
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    total += write(os.path.join(directory, filename), shard, metadata={"format": "pt"})
    weight_map.update({name: filename for name, _ in shard})
  with open(os.path.join(directory, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg.to_hf(), f, indent=2)


def _get(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _map_leaves(tree: dict[str, Any], fn, path: tuple[str, ...] = ()) -> dict[str, Any]:
  return {k: _map_leaves(v, fn, path + (k,)) if isinstance(v, dict) else fn(path + (k,), v)
          for k, v in tree.items()}
