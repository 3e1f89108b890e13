"""Orbax PyTree checkpoint items written and read one slice at a time with tensorstore.

An item directory written by Orbax's StandardCheckpointer (e.g. `CKPT/state/`) holds every leaf of a nested dict
as a zarr array named by its dot-joined key path, all inside one OCDBT key-value store, plus `_METADATA` (the tree
structure and storage flags). Orbax's own save needs each array whole in memory; writing the same layout
directly lets a converter fill arrays far larger than host memory piece by piece, after which Orbax restores it
like any checkpoint (onto any mesh, each host reading only the chunks its shards cover).

Several writers can fill one item together (the threads of a conversion, and its processes): each writes its own
OCDBT database in `ITEM/ocdbt.process_<i>t<lane>/` (one writer per database: OCDBT without a coordinator server
is not safe for concurrent writers, and one writer's data files are written one at a time), and one process then
merges them into the item's root database (`merge_process_dbs`). The merge copies only index entries; the data
stays in the sub-directories, which the root references. This is the layout Orbax itself writes from multi-host
saves.

Item directories may be local paths or gs:// URLs: the arrays then go through tensorstore's gcs driver (which
honours TENSORSTORE_GCS_HTTP_URL) and `_METADATA` through etils.epath.

Paths are tuples of dict keys, e.g. ("moe_layers", "mlp", "experts", "gate").
"""

from __future__ import annotations

from collections.abc import Iterable
import json
import os
import re
from typing import Any

import numpy as np
import tensorstore as ts

from kimi_jax.checkpoint.workdir import as_path, is_url, list_dir

METADATA_FILE = "_METADATA"
COMMIT_SUCCESS_FILE = "commit_success.txt"  # orbax.checkpoint's atomicity_types.COMMIT_SUCCESS_FILE
PROCESS_PREFIX = "ocdbt.process_"  # Orbax's name for per-process databases (ocdbt_process_spec.PROCESS_PREFIX)
Path = tuple[str, ...]


def context(*, cache_bytes: int = 0, concurrency: int = 8, sync: bool = True) -> ts.Context:
  """A tensorstore context. cache_bytes=0 keeps no decoded chunks (writers); readers of coarsely chunked arrays
  want a cache so that slicing one chunk many times decodes it once. OCDBT tree nodes are always cached.
  sync=False skips the fsync after every commit (about 3x faster writes of many chunks); the caller must then
  `os.sync()` before declaring the data complete.
  """
  return ts.Context(
    {
      "cache_pool": {"total_bytes_limit": cache_bytes},
      "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000},
      "data_copy_concurrency": {"limit": concurrency},
      "file_io_concurrency": {"limit": max(concurrency, 32)},
      "file_io_sync": sync,
    }
  )


def _base(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(data, manifest) kvstore specs of the OCDBT database rooted at `directory` (a local path or gs:// URL)."""
  if not is_url(directory):
    root = os.path.abspath(directory) + "/"
    # Data files are only referenced once a manifest commit names them, so they need no atomic rename.
    return (
      {"driver": "file", "path": root, "file_io_locking": {"mode": "non_atomic"}},
      {"driver": "file", "path": root},
    )
  if not directory.startswith("gs://"):
    raise ValueError(f"{directory}: only local paths and gs:// URLs can hold Orbax arrays")
  bucket, _, prefix = directory[len("gs://") :].partition("/")
  prefix = prefix.strip("/")
  if not bucket:
    raise ValueError(f"{directory}: no bucket in the URL (gs://BUCKET/PATH)")
  # Objects appear whole, and the manifest is replaced with a conditional write: no locking to configure.
  gcs = {"driver": "gcs", "bucket": bucket, "path": prefix + "/" if prefix else ""}
  return gcs, dict(gcs)


def _kvstore(directory: str, path: Path, *, write: bool) -> dict[str, Any]:
  base, manifest = _base(directory)
  spec = {
    "driver": "ocdbt",
    "base": base,
    "manifest": manifest,
    "cache_pool": "cache_pool#ocdbt",
    "path": ".".join(path),
  }
  if write:
    # Small values (the .zarray files) inline in the tree and one manifest file, as Orbax writes them. Unlike
    # Orbax (one commit per save, so one huge B-tree node is best), we commit once per piece, and each commit
    # rewrites the B-tree leaf it touches: with Orbax's 100 MB nodes that is the whole index every time
    # (quadratic: 20k commits wrote 2.5x the data in metadata); 64 KiB nodes keep it ~3 KB per commit.
    spec["config"] = {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 65536, "manifest_kind": "single"}
  return spec


def create_array(
  directory: str, path: Path, shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...], ctx: ts.Context
) -> ts.TensorStore:
  """Create (or, when resuming, reopen) the uncompressed zarr array for leaf `path` of the item at `directory`.

  Writes that cover whole chunks never read anything back, so callers write chunk-aligned blocks.
  """
  spec = {
    "driver": "zarr",
    "kvstore": _kvstore(directory, path, write=True),
    "metadata": {"shape": list(shape), "chunks": list(chunks), "compressor": None},
    "dtype": np.dtype(dtype).name,
    # Orbax restores raise on missing chunks, so chunks equal to the fill value (zeros) must be written too.
    "store_data_equal_to_fill_value": True,
    "recheck_cached_data": False,
    "recheck_cached_metadata": False,
  }
  return ts.open(spec, create=True, open=True, context=ctx).result()


def process_dir(directory: str, process_index: int, lane: int = 0) -> str:
  """The directory of the OCDBT database that writing thread `lane` of process `process_index` fills inside the
  item at `directory`. One database per writer: OCDBT writes each database's data files one after another, so
  threads writing one database queue behind a single writer (measured: never two writes in flight). Named as
  Orbax names per-process databases (`ocdbt.process_<alphanumeric id>`), the id `<process>t<lane>`."""
  return _join(directory, f"{PROCESS_PREFIX}{process_index}t{lane}")


def process_dirs(directory: str, process_index: int) -> list[str]:
  """The databases process `process_index` wrote inside the item at `directory` (any lanes), sorted."""
  pattern = re.compile(rf"{re.escape(PROCESS_PREFIX)}{process_index}t\d+")
  return sorted(_join(directory, p.name) for p in list_dir(as_path(directory)) if pattern.fullmatch(p.name))


def _join(directory: str, name: str) -> str:
  return str(as_path(directory) / name) if is_url(directory) else os.path.join(directory, name)


def merge_process_dbs(directory: str, ctx: ts.Context) -> int:
  """Merge every per-writer database under `directory` into the item's root database; returns how many.

  Keys present in several (each array's .zarray, or chunks a resumed conversion wrote twice) must hold the same
  bytes, which the converter guarantees; merging again after an interruption is harmless. One atomic commit:
  the root manifest names all of them or none.
  """
  children = sorted(p.name for p in list_dir(as_path(directory)) if p.name.startswith(PROCESS_PREFIX) and p.is_dir())
  if not children:
    return 0
  parent = ts.KvStore.open(_kvstore(directory, (), write=True), context=ctx).result()
  txn = ts.Transaction(atomic=True)
  for name in children:
    child = ts.KvStore.open(_kvstore(_join(directory, name), (), write=True), context=ctx).result()
    child.experimental_copy_range_to(parent.with_transaction(txn)).result()
  txn.commit_async().result()
  return len(children)


def list_keys(directory: str, ctx: ts.Context) -> list[str]:
  """Every key of the OCDBT database at `directory` (e.g. "moe_layers.mlp.experts.gate/3.1.0.0")."""
  store = ts.KvStore.open(_kvstore(directory, (), write=False), context=ctx).result()
  return [key.decode() for key in store.list().result()]


def write_tree_metadata(directory: str, paths: Iterable[Path]) -> None:
  """Write `_METADATA` naming the tree's leaves; after it the item restores with Orbax.

  Leaves are declared as numpy arrays: they carry no saved sharding, so Orbax restores them onto whatever
  shardings the caller asks for (or as host numpy arrays when none is given).
  """
  tree = {
    str(tuple(path)): {
      "key_metadata": [{"key": k, "key_type": 2} for k in path],  # 2: dict key
      "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
    }
    for path in paths
  }
  meta = {
    "tree_metadata": tree,
    "use_ocdbt": True,
    "use_zarr3": False,
    "store_array_data_equal_to_fill_value": True,
    "custom_metadata": None,
  }
  if is_url(directory):  # an object appears whole or not at all
    (as_path(directory) / METADATA_FILE).write_text(json.dumps(meta))
    # Orbax takes an item on object storage (no atomic directory rename there) as finished only with this file.
    (as_path(directory) / COMMIT_SUCCESS_FILE).write_text(f"Checkpoint commit was successful to {directory}")
    return
  tmp = os.path.join(directory, METADATA_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(meta, f)
  os.replace(tmp, os.path.join(directory, METADATA_FILE))


def read_tree_paths(directory: str) -> list[Path]:
  """The leaf paths of an Orbax item directory, from its `_METADATA`."""
  meta_path = as_path(directory) / METADATA_FILE
  if not meta_path.is_file():
    raise FileNotFoundError(f"{directory}: no {METADATA_FILE}; not a complete Orbax checkpoint item")
  meta = json.loads(meta_path.read_text())
  if not meta.get("use_ocdbt", False):
    raise ValueError(f"{meta_path}: only OCDBT checkpoints (the Orbax default) can be read slice by slice")
  return [tuple(k["key"] for k in leaf["key_metadata"]) for leaf in meta["tree_metadata"].values()]


def open_array(directory: str, path: Path, ctx: ts.Context) -> ts.TensorStore:
  """Open leaf `path` of an Orbax item (ours or Orbax-written) for reading slices."""
  zarr3 = json.loads((as_path(directory) / METADATA_FILE).read_text()).get("use_zarr3", False)
  spec = {
    "driver": "zarr3" if zarr3 else "zarr",
    "kvstore": _kvstore(directory, path, write=False),
    "recheck_cached_data": False,
    "recheck_cached_metadata": False,
  }
  return ts.open(spec, open=True, read=True, context=ctx).result()
