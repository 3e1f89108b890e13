"""Writing the released Hugging Face layout from producers: shards of at most `max_shard_bytes`, filled tensor
by tensor in row blocks (safetensors.write_streaming), then `model.safetensors.index.json` and `config.json`.

A shard file appears only when complete (`.tmp` + rename), so rerunning skips shards that already exist with
the planned header and rewrites the rest. Workers write different shards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import os
import threading
from typing import Any

from kimi_jax.checkpoint.hf import INDEX_FILE
from kimi_jax.checkpoint.io_util import run_bounded, write_json
from kimi_jax.checkpoint.safetensors import SafetensorsError, SafetensorsFile, TensorSpec, write_streaming


def plan_shards(groups: Sequence[Sequence[TensorSpec]], max_bytes: int) -> list[list[TensorSpec]]:
  """Consecutive shards of at most `max_bytes` (one group may exceed it); a group (a weight and its scales)
  never straddles two shards, so a producer can hand its scales to the next spec."""
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for group in groups:
    nbytes = sum(s.nbytes for s in group)
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].extend(group)
    size += nbytes
  return shards


def write_release(
  directory: str,
  groups: Sequence[Sequence[TensorSpec]],
  hf_config: dict[str, Any],
  *,
  max_shard_bytes: int = 4 << 30,
  workers: int = 1,
  on_written: Callable[[int], None] = lambda n: None,
) -> tuple[int, int]:
  """Write every spec into shards under `directory`, then the index and config.json.

  on_written(bytes) is called after each shard (for progress). Returns (bytes planned, bytes written now).
  """
  shards = plan_shards(groups, max_shard_bytes)
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  os.makedirs(directory, exist_ok=True)
  todo = [(n, s) for n, s in zip(names, shards) if not _complete(os.path.join(directory, n), s)]
  total = sum(spec.nbytes for shard in shards for spec in shard)
  on_written(total - sum(spec.nbytes for _, shard in todo for spec in shard))
  written, lock = [0], threading.Lock()

  def write(job):
    name, shard = job
    n = write_streaming(os.path.join(directory, name), shard, metadata={"format": "pt"})
    with lock:
      written[0] += n
      on_written(n)

  run_bounded(write, todo, workers)
  weight_map = {spec.name: name for name, shard in zip(names, shards) for spec in shard}
  write_json(os.path.join(directory, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})
  write_json(os.path.join(directory, "config.json"), hf_config)
  return total, written[0]


def _complete(path: str, shard: list[TensorSpec]) -> bool:
  """A shard left by an earlier run counts if its header lists exactly the planned tensors."""
  if not os.path.isfile(path):
    return False
  try:
    f = SafetensorsFile(path)
  except SafetensorsError:
    return False
  ok = f.names() == [s.name for s in shard] and all(f.info(s.name) == (s.dtype, s.shape) for s in shard)
  f.close()
  return ok
