"""Hugging Face Kimi K2 / DeepSeek-V3 checkpoints: the name mapping and tensor-by-tensor (or row-block) reading.

Our tree holds stacked kernels [L, (E,) in, out]; the release holds one [out, in] tensor per layer (and per
expert). `tensor_map(cfg)` lists every HF tensor with the slice of our tree it fills, so loading, streaming
conversion and writing are loops over the same list. RoPE rows keep the checkpoint's interleaved layout (the
model rotates pairs in place), so no row permutation happens either way.

Reading dequantises FP8 (block-scaled) and INT4 (compressed-tensors) weights to float32 (see quant.py); the
unit of reading is rows [r0, r1) of one HF tensor, so no tensor need ever be whole in memory. Which config.json
holds the text model and which prefix its tensors carry (Kimi K2 vs the K2.5 multimodal wrapper) is layout.py's
business: a checkpoint knows its layout, and `tensor_map` takes one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import threading
from typing import Any

from etils import epath
import ml_dtypes
import numpy as np

from kimi_jax.checkpoint import layout as layouts
from kimi_jax.checkpoint import quant
from kimi_jax.checkpoint.host_ops import transpose_cast
from kimi_jax.checkpoint.safetensors import SafetensorsFile
from kimi_jax.checkpoint.workdir import check_bucket, is_url
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

  def hf_shape(self, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor's shape, given the full shape of our (stacked) leaf."""
    shape = tuple(leaf_shape[len(self.index) :])
    return shape[::-1] if self.transpose else shape

  def target(self, leaf_ndim: int, rows: tuple[int, int]) -> tuple[Any, ...]:
    """Index into our leaf of HF rows [r0, r1) (HF axis 0 is our last axis when transposed)."""
    k = len(self.index)
    idx: list[Any] = list(self.index) + [slice(None)] * (leaf_ndim - k)
    idx[leaf_ndim - 1 if self.transpose else k] = slice(*rows)
    return tuple(idx)

  @property
  def fp8_exportable(self) -> bool:
    """Quantised in the FP8 release: every linear weight except the router and lm_head."""
    return self.transpose and self.path[-2:] != ("router", "kernel") and self.path[0] != "lm_head"


def tensor_map(cfg: ModelConfig, layout: layouts.Layout = layouts.K2) -> list[TensorMap]:
  """Every text-model tensor of a release in `layout`, in checkpoint order."""
  name = layout.hf_name
  out = [TensorMap(name("model.embed_tokens.weight"), ("embed", "embedding"), (), False)]
  attn = [
    ("q_a_proj", "q_a"),
    ("q_b_proj", "q_b"),
    ("kv_a_proj_with_mqa", "kv_a"),
    ("kv_b_proj", "kv_b"),
    ("o_proj", "o"),
  ]
  for i in range(cfg.num_hidden_layers):
    moe = i >= cfg.first_k_dense_replace
    group, layer = ("moe_layers", i - cfg.first_k_dense_replace) if moe else ("dense_layers", i)
    pre = name(f"model.layers.{i}.")

    def add(suffix, path, transpose=True, index=(layer,), pre=pre, group=group):
      out.append(TensorMap(pre + suffix, (group,) + path, index, transpose))

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
  out.append(TensorMap(name("model.norm.weight"), ("final_norm", "scale"), (), False))
  out.append(TensorMap(name("lm_head.weight"), ("lm_head", "kernel"), (), True))
  return out


@dataclasses.dataclass(frozen=True)
class _Stored:
  """How one logical tensor is stored: kind "plain" | "fp8" | "int4", its logical [R, C] shape."""

  kind: str
  shape: tuple[int, ...]


class HFCheckpoint:
  """A released-layout directory: config.json + safetensors shards (+ index). Reads one tensor (or rows) at a time.

  `read(name)` returns float32 for quantised weights (dequantised) and the stored dtype otherwise. `layout` says
  where the text model is (layout.py); `skipped` lists the tensors of other modalities it holds (K2.5's vision
  tower), which nothing reads. A tensor outside the layout is refused on opening. Thread-safe.
  """

  def __init__(self, directory: str):
    """`directory`: a local directory or a gs:// URL (shards are then read by byte ranges, never downloaded)."""
    self.directory = os.fspath(directory)
    if is_url(self.directory):
      check_bucket(self.directory)
    self._root = epath.Path(self.directory)
    config_path = str(self._root / "config.json")
    if not (self._root / "config.json").is_file():
      raise CheckpointError(f"{directory}: no config.json")
    self.hf_config = json.loads((self._root / "config.json").read_text())
    self.layout = layouts.detect(self.hf_config)
    try:
      self.text_config = self.layout.text_config(self.hf_config, config_path)
      scheme = quant.scheme_from_hf(self.text_config, self.layout.text_where(config_path))
    except ValueError as e:
      raise CheckpointError(str(e)) from e
    # A release's tensors say how they are stored; the config only supplies the block / group sizes.
    self._fp8 = scheme if isinstance(scheme, quant.Fp8Scheme) else quant.Fp8Scheme()
    self._int4 = scheme if isinstance(scheme, quant.Int4Scheme) else quant.Int4Scheme()
    if (self._root / INDEX_FILE).is_file():
      self.weight_map: dict[str, str] = json.loads((self._root / INDEX_FILE).read_text())["weight_map"]
    elif (self._root / SINGLE_FILE).is_file():
      self.weight_map = {name: SINGLE_FILE for name in SafetensorsFile(str(self._root / SINGLE_FILE)).names()}
    else:
      raise CheckpointError(f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
    try:
      self.skipped = self.layout.skipped_tensors(self.weight_map, directory)
    except ValueError as e:
      raise CheckpointError(str(e)) from e
    self._files: dict[str, SafetensorsFile] = {}
    self._stored: dict[str, _Stored] = {}
    # An FP8 tensor's pieces (consecutive in the work list) share its small `_scale_inv`: read once, not per piece
    # (each small read is a disk round trip when the large reads bypass the page cache).
    self._whole = functools.lru_cache(maxsize=64)(lambda name: self._file(name).get(name))
    self._lock = threading.Lock()

  def config(self, **runtime: Any) -> ModelConfig:
    return ModelConfig.from_hf(self.hf_config, **runtime)

  def skipped_bytes(self) -> int:
    """Bytes stored for the `skipped` tensors (from the shard headers)."""
    total = 0
    for name in self.skipped:
      dtype, shape = self._file(name).info(name)
      total += math.prod(shape) * dtype.itemsize
    return total

  def where(self, name: str) -> str:
    return str(self._root / self.weight_map.get(name, "?"))

  def shape(self, name: str) -> tuple[int, ...]:
    """The logical (dequantised) shape; validates the quantisation tensors' shapes and dtypes."""
    return self._describe(name).shape

  def nbytes(self, name: str) -> int:
    """Bytes stored for the tensor (its scales and packing included)."""
    names = [name]
    if self._describe(name).kind == "fp8":
      names.append(name + quant.FP8_SCALE_SUFFIX)
    elif self._describe(name).kind == "int4":
      names = [name + s for s in quant.INT4_SUFFIXES]
    total = 0
    for n in names:
      dtype, shape = self._file(n).info(n)
      total += math.prod(shape) * dtype.itemsize
    return total

  def read(
    self, name: str, rows: tuple[int, int] | None = None, *, transpose: bool = False, dtype: np.dtype | None = None
  ) -> np.ndarray:
    """Rows [r0, r1) of the tensor (all by default), [r, C] or [C, r] with `transpose`, C-contiguous, in `dtype`
    (default: float32 if quantised, else the stored dtype)."""
    stored = self._describe(name)
    if stored.kind == "plain":
      return transpose_cast(self._file(name).get(name, rows), dtype, transpose)
    if stored.kind == "fp8":
      scale_name = name + quant.FP8_SCALE_SUFFIX
      scale = self._whole(scale_name)
      return quant.fp8_dequantize(
        self._file(name).get(name, rows),
        scale,
        self._fp8.block,
        rows[0] if rows else 0,
        transpose=transpose,
        dtype=dtype,  # decoded straight to it: the bits of the float32 result cast, one pass fewer
      )
    packed, scale = (name + s for s in quant.INT4_SUFFIXES[:2])
    return quant.int4_dequantize(
      self._file(packed).get(packed, rows),
      self._file(scale).get(scale, rows),
      stored.shape[1],
      self._int4.group,
      transpose=transpose,
      dtype=dtype,
    )

  def _describe(self, name: str) -> _Stored:
    if name not in self._stored:
      self._stored[name] = self._inspect(name)
    return self._stored[name]

  def _inspect(self, name: str) -> _Stored:
    scale_name = name + quant.FP8_SCALE_SUFFIX
    if name in self.weight_map:
      dtype, shape = self._file(name).info(name)
      if dtype != quant.FP8_DTYPE:
        if scale_name in self.weight_map:
          raise CheckpointError(
            f"tensor {name!r} in {self.where(name)} has a {scale_name!r} but dtype {dtype}, not float8_e4m3fn"
          )
        return _Stored("plain", shape)
      if scale_name not in self.weight_map:
        raise CheckpointError(f"FP8 tensor {name!r} in {self.where(name)} has no {scale_name!r}")
      if len(shape) != 2:
        raise CheckpointError(f"FP8 tensor {name!r} in {self.where(name)} has shape {shape}; expected 2-D")
      self._expect(
        scale_name,
        self._fp8.scale_shape(shape),
        "float",
        f"[ceil({shape[0]}/{self._fp8.block[0]}), ceil({shape[1]}/{self._fp8.block[1]})]",
      )
      return _Stored("fp8", shape)
    packed, scale, shape_name = (name + s for s in quant.INT4_SUFFIXES)
    if packed not in self.weight_map:
      raise CheckpointError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
    for n in (scale, shape_name):
      if n not in self.weight_map:
        raise CheckpointError(f"INT4 tensor {packed!r} in {self.where(packed)} has no {n!r}")
    self._expect(shape_name, (2,), "int", "[2]")
    r, c = (int(v) for v in self._file(shape_name).get(shape_name))
    group = self._int4.group
    if c % group:
      raise CheckpointError(
        f"{shape_name!r} in {self.where(shape_name)} says {c} columns, not a multiple of the group size {group}"
      )
    self._expect(packed, (r, math.ceil(c / 8)), "int32", f"[{r}, ceil({c}/8)] from {shape_name!r}")
    self._expect(scale, (r, c // group), "float", f"[{r}, {c}/{group}] from {shape_name!r}")
    return _Stored("int4", (r, c))

  def _expect(self, name: str, shape: tuple[int, ...], kind: str, rule: str) -> None:
    dtype, actual = self._file(name).info(name)
    ok_dtype = {
      "float": np.issubdtype(dtype, np.floating) or dtype == np.dtype(ml_dtypes.bfloat16),
      "int": np.issubdtype(dtype, np.integer),
      "int32": dtype == np.int32,
    }[kind]
    if not ok_dtype:
      raise CheckpointError(f"tensor {name!r} in {self.where(name)} has dtype {dtype}; expected {kind}")
    if tuple(actual) != tuple(shape):
      raise CheckpointError(
        f"tensor {name!r} in {self.where(name)} has shape {tuple(actual)}; expected {tuple(shape)} = {rule}"
      )

  def _file(self, name: str) -> SafetensorsFile:
    if name not in self.weight_map:
      raise CheckpointError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
    shard = self.weight_map[name]
    with self._lock:
      if shard not in self._files:
        if not (self._root / shard).is_file():
          raise CheckpointError(f"{self.directory}: shard {shard} (holding {name!r}) is missing")
        self._files[shard] = SafetensorsFile(str(self._root / shard))
      return self._files[shard]

  def close(self) -> None:
    for f in self._files.values():
      f.close()


def abstract_state(cfg: ModelConfig) -> dict[str, Any]:
  """Our full model state (params and router biases) as a nested dict of ShapeDtypeStructs."""
  from kimi_jax import model_stats  # imports the model (flax, jax), which reading safetensors does not need

  return model_stats.abstract_state(cfg)


def leaf_dtype(path: tuple[str, ...], dtype: np.dtype) -> np.dtype:
  """The stored dtype of a leaf: the router bias stays float32 (it steers routing in fine steps)."""
  return np.dtype(np.float32) if path[-1] == "bias" else np.dtype(dtype)


def checked_entries(
  ckpt: HFCheckpoint, cfg: ModelConfig, leaves: dict[tuple[str, ...], Any]
) -> list[tuple[TensorMap, tuple[int, ...]]]:
  """Every tensor_map entry with its full leaf shape, after checking each HF tensor against the config.

  leaves: flatten(abstract_state(cfg)).
  """
  out = []
  for entry in tensor_map(cfg, ckpt.layout):
    leaf_shape = tuple(leaves[entry.path].shape)
    expected, actual = entry.hf_shape(leaf_shape), ckpt.shape(entry.hf_name)
    if tuple(actual) != expected:
      raise CheckpointError(
        f"tensor {entry.hf_name!r} in {ckpt.where(entry.hf_name)} has shape "
        f"{tuple(actual)}, but the config needs {expected}"
      )
    out.append((entry, leaf_shape))
  return out


def load_state(ckpt: HFCheckpoint, cfg: ModelConfig, dtype: np.dtype | None = None) -> dict[str, Any]:
  """Read every tensor into host numpy arrays shaped like `abstract_state(cfg)` (for small models and tests).

  Float leaves take `dtype` (default: the config's param_dtype); the router bias stays float32.
  """
  float_dtype = np.dtype(dtype or (ml_dtypes.bfloat16 if cfg.param_dtype == "bfloat16" else np.float32))
  leaves = flatten(abstract_state(cfg))
  entries = checked_entries(ckpt, cfg, leaves)
  state = {path: np.zeros(leaf.shape, leaf_dtype(path, float_dtype)) for path, leaf in leaves.items()}
  for entry, _ in entries:
    leaf = state[entry.path]
    leaf[entry.index] = ckpt.read(entry.hf_name, transpose=entry.transpose, dtype=leaf.dtype)
  return unflatten(state)


def flatten(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
  return out


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree
