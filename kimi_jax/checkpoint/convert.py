"""Streaming conversion between Hugging Face releases and kimi-jax model checkpoints (config.json + state/).

hf_to_orbax: the work is a list of pieces, each rows [r0, r1) of one HF tensor (at most `piece_elements`
elements). A worker reads a piece (pread), dequantises it (FP8/INT4 → f32), transposes and casts it, and writes
it as whole chunks of its stacked target array in the Orbax item `OUT/state` (orbax_arrays.py): chunks are
(1, 1, in, rows) for experts, so a (layer, expert) slice goes to disk as soon as it is read. Each worker thread
writes an OCDBT database of its own, `OUT/state/ocdbt.process_<process>t<thread>/` (one database's writes run one
at a time), and the item's root database is made to reference them all once every piece is done
(orbax_arrays.merge_process_dbs). Peak host memory is about workers × a piece's working set (~12 bytes per
element), not the model: K2's 1 TB needs no more RAM than a 1 GB model. Each finished piece is appended to
`OUT/conversion.log`; a rerun skips those, and the item's `_METADATA` (which makes it restorable) and
`config.json` are written last.

Multi-process (hosts sharing OUT, no service between them): process i of n takes a contiguous share of the
piece list, ~1/n of the source bytes (`share`), writes it into its own databases (OCDBT has one writer per
database unless a coordinator server runs) and logs it in `OUT/conversion.i.log`, then syncs and writes
`OUT/conversion.i-of-n.done`. Process 0, after its own share, waits for the others' markers, checks that the
union of the logs covers every piece, merges every database into the item's root one (index entries only) and
writes the metadata and config.json as above. Every chunk holds the same bytes whichever thread or process wrote
it, so the result equals a one-process conversion bit for bit, and a rerun resumes from the union of the logs with
any process count.

orbax_to_hf: shards are planned from the config alone (names, dtypes, shapes); each shard file is filled
tensor by tensor in row blocks read from the Orbax arrays (optionally re-quantised to FP8 with 128×128 blocks),
written to `.tmp` and renamed, so a rerun skips complete shards. Workers write different shards.

OUT may be a gs:// URL: the arrays go through tensorstore's gcs driver, every other file through etils.epath.
Objects cannot be appended to, so there each process keeps its log in memory and rewrites the whole log object
(`PieceLog`) at most every LOG_FLUSH_SECONDS (longer when uploads are slow, keeping them to ~1/10 of the time),
when the run ends and when it fails; a kill loses at most the last interval's lines, whose pieces a rerun redoes
(rewriting identical chunks). Cost: the log is ~50 bytes a piece (K2: ~280k pieces, ~14 MB at the end), so a
one-hour one-process K2 conversion uploads at most ~360 log versions, a few GB next to the 1 TB of arrays. Each
piece's chunks are durable once its OCDBT commit returns (no sync needed), and `_METADATA`, config.json and the
complete status are written last, as locally.

Both directions handle every release layout (layout.py): hf_to_orbax reads the layout from config.json (a Kimi
K2.5 wrapper: text tensors under `language_model.`, vision tensors skipped and reported in one line, the wrapper's
fields kept in OUT/hf_wrapper.json); orbax_to_hf writes the layout it is asked for.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import threading
import time
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts

from kimi_jax.checkpoint import layout as layouts
from kimi_jax.checkpoint import orbax_arrays, quant
from kimi_jax.checkpoint.hf import (
  CheckpointError,
  HFCheckpoint,
  TensorMap,
  abstract_state,
  checked_entries,
  flatten,
  leaf_dtype,
  tensor_map,
)
from kimi_jax.checkpoint.hf_write import write_release
from kimi_jax.checkpoint.host_ops import transpose_cast
from kimi_jax.checkpoint.io_util import progress_bar, run_bounded, write_json
from kimi_jax.checkpoint.safetensors import TensorSpec
from kimi_jax.checkpoint.workdir import CONFIG_FILE, STATE_DIR, as_path, check_bucket, is_url, list_dir
from kimi_jax.config import ModelConfig

PIECE_ELEMENTS = 1 << 22  # 4 Mi elements: 16 MiB as f32; a K2 expert matrix (14.7 Mi) is 4 pieces
STATUS_FILE = "conversion.json"
LOG_FILE = "conversion.log"
LOG_FLUSH_SECONDS = 5.0  # object storage: the longest a kill can make a rerun redo (see PieceLog)
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


@dataclasses.dataclass
class Stats:
  bytes_read: int = 0
  bytes_written: int = 0
  seconds: float = 0.0
  skipped_tensors: int = 0  # tensors of other modalities left out (K2.5's vision tower and projector)
  skipped_bytes: int = 0

  def add(self, read: int, written: int) -> None:
    self.bytes_read += read
    self.bytes_written += written


def block_rows(hf_shape: tuple[int, ...], max_elements: int, align: int = 128) -> int:
  """Rows per piece for a tensor of `hf_shape`: all of it if small, else a multiple of `align` (FP8 block rows)."""
  rows, row_size = hf_shape[0], math.prod(hf_shape[1:])
  if len(hf_shape) < 2 or rows * row_size <= max_elements:
    return rows
  return min(rows, max(align, max_elements // row_size // align * align))


def _row_ranges(rows: int, step: int) -> list[tuple[int, int]]:
  return [(r, min(r + step, rows)) for r in range(0, rows, step)]


# HF → Orbax ----------------------------------------------------------------------------------------------------


def hf_to_orbax(
  hf_dir: str,
  out_dir: str,
  *,
  dtype: str = "float32",
  workers: int | None = 4,
  piece_elements: int = PIECE_ELEMENTS,
  progress: bool = False,
  process_index: int = 0,
  process_count: int = 1,
  wait_timeout: float | None = None,
) -> Stats:
  """Convert the HF checkpoint at `hf_dir` into the model checkpoint `out_dir` (config.json + state/).

  Weights are stored in `dtype` (the router bias in float32); the saved config's param_dtype is `dtype`.
  Rerunning after an interruption resumes; rerunning a finished conversion does nothing. Tensors the layout
  skips (K2.5's vision weights) are counted in one printed line and in the returned Stats.

  Multi-process: `process_count` processes (any hosts sharing `out_dir`) each run this with their own
  `process_index` and convert a disjoint, contiguous share of the pieces (about 1/process_count of the source
  bytes) into their own database under state/ (see `share` and the module docstring). Process 0 then waits
  (at most `wait_timeout` seconds; None: forever) for every other process's done marker, merges the databases and
  writes the metadata and config.json; the others return when their share is done. The result restores to the
  same arrays, bit for bit, as a one-process conversion. Resuming works with any process count.
  """
  if dtype not in _DTYPES:
    raise ValueError(f"dtype {dtype!r} not in {sorted(_DTYPES)}")
  workers = workers or default_workers()
  if not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index {process_index} is not in [0, process_count={process_count}); give each "
      "process its own index 0 .. process_count - 1"
    )
  start = time.perf_counter()
  ckpt = HFCheckpoint(hf_dir)
  cfg = ckpt.config(param_dtype=dtype)
  # The decode programs compile on a thread of their own while the model's shapes are worked out and the target
  # arrays created (seconds of start-up a small conversion would otherwise spend before and between its pieces).
  precompiler = Precompiler(decode_programs(ckpt, cfg, _DTYPES[dtype], piece_elements))
  try:
    return _hf_to_orbax(
      ckpt, cfg, out_dir, dtype, workers, piece_elements, progress, process_index, process_count, wait_timeout, start
    )
  finally:
    precompiler.close()


def _hf_to_orbax(
  ckpt: HFCheckpoint,
  cfg: ModelConfig,
  out_dir: str,
  dtype: str,
  workers: int,
  piece_elements: int,
  progress: bool,
  process_index: int,
  process_count: int,
  wait_timeout: float | None,
  start: float,
) -> Stats:
  hf_dir = ckpt.directory
  leaves = flatten(abstract_state(cfg))
  entries = checked_entries(ckpt, cfg, leaves)  # every tensor is checked before anything is written
  skipped = Stats(skipped_tensors=len(ckpt.skipped), skipped_bytes=ckpt.skipped_bytes())
  if ckpt.skipped and process_index == 0:
    prefixes = sorted({name.split(".")[0] for name in ckpt.skipped})
    print(
      f"hf-to-orbax: skipping {skipped.skipped_tensors} tensors ({skipped.skipped_bytes:,} bytes, "
      f"{skipped.skipped_bytes / 1e9:.2f} GB) outside the text model: {', '.join(p + '.*' for p in prefixes)}",
      flush=True,
    )
  remote = is_url(out_dir)
  if remote:
    check_bucket(out_dir, write=True)
  else:
    out_dir = os.path.abspath(out_dir)
  out = as_path(out_dir)
  state_dir = str(out / STATE_DIR) if remote else os.path.join(out_dir, STATE_DIR)
  source = hf_dir if is_url(hf_dir) else os.path.abspath(hf_dir)
  status = {"source": source, "dtype": dtype, "piece_elements": piece_elements}
  done = _start_or_resume(out_dir, status, state_dir)
  if done is None:
    return skipped

  rows_of = {entry.path: block_rows(entry.hf_shape(shape), piece_elements) for entry, shape in entries}
  pieces = [
    (entry, rows) for entry, shape in entries for rows in _row_ranges(entry.hf_shape(shape)[0], rows_of[entry.path])
  ]
  stored = {entry.hf_name: ckpt.nbytes(entry.hf_name) / entry.hf_shape(shape)[0] for entry, shape in entries}
  sizes = [int(stored[e.hf_name] * (r[1] - r[0])) for e, r in pieces]
  mine = share(sizes, process_index, process_count)
  _check_targets(leaves, entries)
  # No fsync per chunk: a killed process loses nothing (the kernel holds the data), and the conversion syncs once
  # before writing the metadata that makes the checkpoint complete.
  ctx = orbax_arrays.context(concurrency=workers, sync=False)
  lanes = _Lanes(state_dir, process_index, (leaves, entries, rows_of, _DTYPES[dtype], ctx))
  todo = [pieces[i] for i in range(mine.start, mine.stop) if _key(*pieces[i]) not in done]
  total = sum(sizes[mine])
  bar = progress_bar(
    progress,
    total,
    total - sum(stored[e.hf_name] * (r[1] - r[0]) for e, r in todo),
    "hf-to-orbax" if process_count == 1 else f"hf-to-orbax [{process_index}/{process_count}]",
  )
  stats, log_lock = skipped, threading.Lock()

  with PieceLog(out / _log_file(process_index, process_count)) as log:

    def convert(piece: tuple[TensorMap, tuple[int, int]]) -> None:
      entry, rows = piece
      target = lanes.arrays()[entry.path]
      value = ckpt.read(entry.hf_name, rows, transpose=entry.transpose, dtype=target.dtype.numpy_dtype)
      # Never changed again, so tensorstore may encode the chunks from `value` itself rather than from a copy.
      target[entry.target(target.rank, rows)].write(value, can_reference_source_data_indefinitely=True).result()
      read = int(stored[entry.hf_name] * (rows[1] - rows[0]))
      log.add(_key(entry, rows))  # logged only once committed: a rerun redoes anything not logged
      with log_lock:
        stats.add(read, value.nbytes)
        bar.update(read)

    run_bounded(convert, todo, workers)
  bar.close()
  if not remote:  # (object storage: a commit that returned is durable)
    os.sync()  # this process's chunks are durable before its done marker says so (hosts may share out_dir remotely)
  ckpt_layout, hf_config = ckpt.layout, ckpt.hf_config
  ckpt.close()
  if process_index != 0:
    _write_json(out / _done_file(process_index, process_count), {"pieces": mine.stop - mine.start})
    stats.seconds = time.perf_counter() - start
    return stats

  _wait_for_peers(out_dir, process_count, wait_timeout)
  done = _logged(out_dir)
  if missing := [_key(*p) for p in pieces if _key(*p) not in done]:
    raise CheckpointError(
      f"{out_dir}: every process reported its share done, but {len(missing)} pieces are not "
      f"logged (e.g. {missing[0]}); rerun all processes with the same --process_count"
    )
  if not remote:
    os.sync()  # peers on this host: their writes reach the disk before the metadata that declares them complete
  orbax_arrays.merge_process_dbs(state_dir, orbax_arrays.context(concurrency=workers))
  orbax_arrays.write_tree_metadata(state_dir, leaves)
  carried = ckpt_layout.carried(hf_config)
  if carried is not None:  # written before the status file marks the conversion complete
    _write_json(out / layouts.WRAPPER_FILE, carried)
  _write_json(out / CONFIG_FILE, cfg.to_dict())  # model_io.save_config's file
  stats.seconds = time.perf_counter() - start
  _write_json(out / STATUS_FILE, {**status, "complete": True, "seconds": stats.seconds})
  for path in list_dir(out):
    if _LOG_RE.fullmatch(path.name) or _DONE_RE.fullmatch(path.name):
      path.unlink()
  return stats


def decode_programs(ckpt: HFCheckpoint, cfg: ModelConfig, dtype: np.dtype, piece_elements: int) -> list:
  """The host programs (quant.Program) that decoding every piece of `ckpt`'s FP8/INT4 tensors into `dtype` runs,
  each once, in the order the pieces first need them; from the shard headers alone. [] if the checkpoint does
  not check out (the conversion then reports why)."""
  try:
    scheme = quant.scheme_from_hf(ckpt.text_config, "config.json")
    fp8 = scheme if isinstance(scheme, quant.Fp8Scheme) else quant.Fp8Scheme()  # as HFCheckpoint reads them
    int4 = scheme if isinstance(scheme, quant.Int4Scheme) else quant.Int4Scheme()
    programs: dict = {}
    for entry in tensor_map(cfg, ckpt.layout):
      name, shape = entry.hf_name, ckpt.shape(entry.hf_name)
      if len(shape) != 2:
        continue
      if name + quant.FP8_SCALE_SUFFIX in ckpt.weight_map:
        make = functools.partial(quant.fp8_programs, block=fp8.block)
      elif name + quant.INT4_SUFFIXES[0] in ckpt.weight_map:
        make = functools.partial(quant.int4_programs, group=int4.group)
      else:
        continue
      for rows in dict.fromkeys(r1 - r0 for r0, r1 in _row_ranges(shape[0], block_rows(shape, piece_elements))):
        for p in make(rows, shape[1], transpose=entry.transpose, dtype=leaf_dtype(entry.path, dtype)):
          programs.setdefault(p)
    return list(programs)
  except (CheckpointError, ValueError, OSError):
    return []


class Precompiler:
  """Compiles `programs` (quant.precompile) in order on a thread of its own. A worker that needs one before the
  thread reaches it compiles it itself (the thread then skips it); errors are left for that worker to meet."""

  def __init__(self, programs: list):
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(programs,), name="precompile", daemon=True)
    self._thread.start()

  def _run(self, programs: list) -> None:
    for program in programs:
      if self._stop.is_set():
        return
      with contextlib.suppress(Exception):  # the worker decoding such a piece compiles it again and raises
        quant.precompile([program])

  def close(self) -> None:
    """Stop after the program being compiled (if any) and wait for the thread."""
    self._stop.set()
    self._thread.join()


def default_workers() -> int:
  """Threads for `workers=None` (or 0): two per core this process may run on (os.sched_getaffinity), at least 4.
  A piece's thread spends its time in pread, XLA's decode (which releases the GIL) and tensorstore's write, so
  two per core keep every core decoding while others wait on the disk."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    cores = os.cpu_count() or 1
  return max(4, 2 * cores)


def _write_json(path, obj: Any) -> None:
  """Readers never see half a file: locally a temporary file and a rename; an object appears whole anyway."""
  if is_url(path):
    path.write_text(json.dumps(obj, indent=2))
  else:
    write_json(os.fspath(path), obj)


class PieceLog:
  """The keys of the pieces this process has converted, one a line, in `path` (local path or URL).

  Locally each key is appended and flushed at once (a kill loses nothing; a line it cuts short is ignored on
  reading). Objects cannot be appended to, so for a URL the keys are kept in memory (starting with the object's
  own lines when resuming) and the whole object is rewritten at most every LOG_FLUSH_SECONDS (or 10x the last
  upload's time, if longer), and at exit, error or not. Every flushed version lists only committed pieces.
  """

  def __init__(self, path):
    self._path, self._remote = path, is_url(path)
    self._lock, self._upload_lock = threading.Lock(), threading.Lock()
    self._file = None
    self._lines: list[str] = []
    self._dirty, self._flushed_at, self._interval = False, time.monotonic(), LOG_FLUSH_SECONDS
    if self._remote and path.exists():
      self._lines = [line + "\n" for line in path.read_text().splitlines()]

  def __enter__(self) -> PieceLog:
    if not self._remote:
      self._file = open(self._path, "a")  # noqa: SIM115 (closed in __exit__)
    return self

  def add(self, key: str) -> None:
    with self._lock:
      if self._file is not None:
        self._file.write(key + "\n")
        self._file.flush()
        return
      self._lines.append(key + "\n")
      self._dirty = True
    if time.monotonic() - self._flushed_at >= self._interval:
      self.flush(wait=False)

  def flush(self, wait: bool = True) -> None:
    """Rewrite the object with every key added so far (URL only); one upload at a time, the others skip."""
    if self._file is not None or not self._upload_lock.acquire(blocking=wait):
      return
    try:
      with self._lock:
        if not self._dirty:
          return
        text, self._dirty = "".join(self._lines), False
      start = time.monotonic()
      try:
        self._path.write_text(text)
      except BaseException:
        self._dirty = True
        raise
      self._flushed_at = time.monotonic()
      self._interval = max(LOG_FLUSH_SECONDS, 10 * (self._flushed_at - start))
    finally:
      self._upload_lock.release()

  def __exit__(self, *exc) -> None:
    if self._file is not None:
      self._file.close()
    else:
      self.flush()


def share(sizes: list[int], process_index: int, process_count: int) -> slice:
  """The pieces process `process_index` of `process_count` converts: a contiguous run (pieces follow the release's
  tensor order, so a process reads few, neighbouring shard files) cut where the running total of `sizes` (source
  bytes) crosses k / process_count of the whole. Every process computes the same cuts from the same list."""
  prefix = [0, *itertools.accumulate(sizes)]
  scaled = [p * process_count for p in prefix]  # integers: no rounding can make two processes disagree
  cuts = [0, *(bisect.bisect_left(scaled, k * prefix[-1]) for k in range(1, process_count)), len(sizes)]
  return slice(cuts[process_index], cuts[process_index + 1])


def _log_file(process_index: int, process_count: int) -> str:
  """Each process appends to its own log (no two writers of one file, on any file system)."""
  return LOG_FILE if process_count == 1 else f"conversion.{process_index}.log"


def _done_file(process_index: int, process_count: int) -> str:
  # The count is in the name: a marker left by a run with another count (other shares) is never taken as ours.
  return f"conversion.{process_index}-of-{process_count}.done"


_LOG_RE = re.compile(r"conversion(\.\d+)?\.log")
_DONE_RE = re.compile(r"conversion\.\d+-of-\d+\.done")
WAIT_POLL_SECONDS = 0.5


def _wait_for_peers(out_dir: str, process_count: int, timeout: float | None) -> None:
  """Block until processes 1 .. process_count - 1 have written their done markers."""
  start = last_report = time.monotonic()
  out = as_path(out_dir)
  while missing := [i for i in range(1, process_count) if not (out / _done_file(i, process_count)).exists()]:
    now = time.monotonic()
    if timeout is not None and now - start > timeout:
      raise TimeoutError(
        f"{out_dir}: processes {missing} of {process_count} have not finished their shares after "
        f"{timeout:.0f} s; (re)start them with the same command and their --process_index"
      )
    if now - last_report > 60:
      print(
        f"hf-to-orbax: process 0 waiting for processes {missing} of {process_count} to finish their shares", flush=True
      )
      last_report = now
    time.sleep(WAIT_POLL_SECONDS)


def _logged(out_dir: str) -> set[str]:
  """The keys of the pieces any process has logged as converted."""
  done = set()
  for path in list_dir(as_path(out_dir)):
    if _LOG_RE.fullmatch(path.name):
      text = path.read_text()
      lines = text.split("\n")[:-1]  # a line cut by a kill (no newline) is not a finished piece
      done.update(lines)
  return done


def _check_targets(leaves: dict, entries: list[tuple[TensorMap, tuple[int, ...]]]) -> None:
  if missing := sorted(".".join(p) for p in set(leaves) - {entry.path for entry, _ in entries}):
    raise CheckpointError(f"no HF tensor maps to {', '.join(missing)}")


class _Lanes:
  """The target arrays of each converting thread, in a database of its own (orbax_arrays.process_dir: one lane
  per thread, numbered as threads first ask). OCDBT writes one database's data files one at a time, so with one
  database for all threads the page-cache copies of every write ran on one core while the decoders waited."""

  def __init__(self, state_dir: str, process_index: int, target_args: tuple):
    self._args = target_args  # _create_targets' arguments after the directory
    self._state_dir, self._process_index = state_dir, process_index
    self._local, self._lock, self._count = threading.local(), threading.Lock(), 0

  def arrays(self) -> dict:
    if not hasattr(self._local, "arrays"):
      with self._lock:
        lane, self._count = self._count, self._count + 1
      db_dir = orbax_arrays.process_dir(self._state_dir, self._process_index, lane)
      self._local.arrays = _create_targets(db_dir, *self._args)
    return self._local.arrays


def _create_targets(
  state_dir: str, leaves: dict, entries: list, rows_of: dict, dtype: np.dtype, ctx: ts.Context
) -> dict:
  """The zarr array of every leaf, chunked so that each piece is whole chunks: one (layer, expert) and the
  piece's rows (our last axis when transposed) per chunk."""
  entry_of = {}
  for entry, _ in entries:
    entry_of.setdefault(entry.path, entry)
  arrays = {}
  for path, leaf in leaves.items():
    entry, shape = entry_of[path], tuple(leaf.shape)
    chunks = [1] * len(entry.index) + list(shape[len(entry.index) :])
    chunks[len(shape) - 1 if entry.transpose else len(entry.index)] = rows_of[path]
    arrays[path] = orbax_arrays.create_array(state_dir, path, shape, leaf_dtype(path, dtype), tuple(chunks), ctx)
  return arrays


def _key(entry: TensorMap, rows: tuple[int, int]) -> str:
  return f"{entry.hf_name}[{rows[0]}:{rows[1]}]"


def _start_or_resume(out_dir: str, status: dict[str, Any], state_dir: str) -> set[str] | None:
  """The keys of pieces already converted (None: the conversion is complete). Refuses foreign directories.

  Safe with several processes starting at once: each writes the (identical) status only if none exists, and
  state/ is created after the status, so whoever finds state/ also finds the status.
  """
  remote = is_url(out_dir)
  status_path = as_path(out_dir) / STATUS_FILE
  state_existed = as_path(state_dir).exists()  # looked at before the status: see the docstring
  if status_path.is_file():
    previous = json.loads(status_path.read_text())
    changed = {k: (previous.get(k), v) for k, v in status.items() if previous.get(k) != v}
    if changed:
      raise ValueError(f"{out_dir} holds a conversion with other settings ({changed}); use another --out_dir")
    if previous.get("complete"):
      return None
  elif state_existed:
    raise ValueError(
      f"{out_dir} already holds a checkpoint that is not a conversion in progress; use another --out_dir"
    )
  elif remote:  # an object appears whole; object storage has no directories to make
    status_path.write_text(json.dumps({**status, "complete": False}, indent=2))
  else:
    os.makedirs(out_dir, exist_ok=True)
    # A name of its own (pids repeat across hosts): processes starting together must not rename one another's away.
    tmp = f"{status_path}.{os.urandom(8).hex()}.tmp"
    with open(tmp, "w") as f:
      json.dump({**status, "complete": False}, f, indent=2)
    os.replace(tmp, status_path)
  if not remote:
    os.makedirs(state_dir, exist_ok=True)
  return _logged(out_dir)


# Orbax → HF ----------------------------------------------------------------------------------------------------


def orbax_to_hf(
  checkpoint: str,
  out_dir: str,
  *,
  dtype: str = "bfloat16",
  fp8: bool = False,
  layout: str = "k2",
  wrapper_config: str | None = None,
  workers: int = 4,
  max_shard_bytes: int = 4 << 30,
  piece_elements: int = PIECE_ELEMENTS,
  progress: bool = False,
) -> Stats:
  """Write the model checkpoint (or training workdir) `checkpoint` in the released per-expert layout.

  Weights in `dtype` (the router bias in float32); with `fp8`, every linear weight but the router and lm_head is
  quantised to float8_e4m3fn with a `_scale_inv` per 128×128 block, as in Kimi-K2-Instruct. Routed experts are
  never written as INT4: an export of Kimi-K2-Thinking or K2.5 holds them in `dtype` (or FP8) and says so in its
  quantization_config (none for plain weights).

  layout: "k2" (Kimi K2 names and config.json) or "k25" (Kimi K2.5 / K2.6 / K2.7: `language_model.` names and
  the multimodal wrapper config.json, without vision weights). The wrapper's own fields (vision_config, token
  ids, ...) come from `wrapper_config` (a K2.5 release's config.json) if given, else from the hf_wrapper.json that
  hf_to_orbax kept in `checkpoint`; with neither the wrapper has no vision_config.
  """
  if dtype not in _DTYPES:
    raise ValueError(f"dtype {dtype!r} not in {sorted(_DTYPES)}")
  if is_url(out_dir):
    raise ValueError(
      f"{out_dir}: orbax-to-hf writes a local directory (safetensors shards are written in place); "
      "give a local --out_dir and copy it up (`gcloud storage cp -r`)"
    )
  target = layouts.get(layout)
  carried = layouts.find_carried(target, checkpoint, wrapper_config)
  start = time.perf_counter()
  cfg, item_dir, names = _locate_state(checkpoint)
  leaves = flatten(abstract_state(cfg))
  ctx = orbax_arrays.context(cache_bytes=128 << 20, concurrency=workers)
  arrays: dict[tuple[str, ...], Any] = {}
  arrays_lock = threading.Lock()

  def array(path):
    with arrays_lock:
      if path not in arrays:
        if path not in names:
          raise CheckpointError(f"{item_dir}: no array for {'.'.join(path)} (config/checkpoint mismatch)")
        arrays[path] = orbax_arrays.open_array(item_dir, names[path], ctx)
        if tuple(arrays[path].shape) != tuple(leaves[path].shape):
          raise CheckpointError(
            f"{item_dir}: array {'.'.join(names[path])} has shape {tuple(arrays[path].shape)}, "
            f"but the config needs {tuple(leaves[path].shape)}"
          )
      return arrays[path]

  def read(entry: TensorMap, rows: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    arr = array(entry.path)
    return transpose_cast(arr[entry.target(arr.rank, rows)].read().result(), dtype, entry.transpose)

  scheme = quant.Fp8Scheme() if fp8 else None
  groups = [
    _export_specs(
      entry,
      entry.hf_shape(tuple(leaves[entry.path].shape)),
      read,
      leaf_dtype(entry.path, _DTYPES[dtype]),
      scheme if entry.fp8_exportable else None,
      piece_elements,
    )
    for entry in tensor_map(cfg, target)
  ]
  text_config = cfg.to_hf()
  if scheme:
    text_config["quantization_config"] = scheme.hf_config()
  hf_config = target.hf_config(text_config, carried)
  if isinstance(target, layouts.WrapperLayout) and carried is None:
    print(
      f"orbax-to-hf: {checkpoint} keeps no {target.title} wrapper fields ({layouts.WRAPPER_FILE}), so "
      "config.json gets no vision_config; pass the release's config.json as wrapper_config to carry them",
      flush=True,
    )
  bar = progress_bar(progress, sum(s.nbytes for g in groups for s in g), 0, "orbax-to-hf")
  _, written = write_release(
    out_dir, groups, hf_config, max_shard_bytes=max_shard_bytes, workers=workers, on_written=bar.update
  )
  bar.close()
  return Stats(written, written, time.perf_counter() - start)


def _export_specs(
  entry: TensorMap,
  shape: tuple[int, ...],
  read: Callable,
  dtype: np.dtype,
  scheme: quant.Fp8Scheme | None,
  piece_elements: int,
) -> list[TensorSpec]:
  """The spec of one HF tensor (plus its `_scale_inv` when FP8), producing row blocks from `read`."""
  ranges = _row_ranges(shape[0], block_rows(shape, piece_elements, scheme.block[0] if scheme else 128))
  if scheme is None:
    return [TensorSpec(entry.hf_name, dtype, shape, lambda: (read(entry, r, dtype) for r in ranges))]
  scales: list[np.ndarray] = []  # filled while the weight is written; the scale follows it in the same shard

  def weight() -> Iterator[np.ndarray]:
    scales.clear()
    for r in ranges:
      wq, scale = quant.fp8_quantize(read(entry, r, np.float32), scheme.block)
      scales.append(scale)
      yield wq

  scale_name = entry.hf_name + quant.FP8_SCALE_SUFFIX
  return [
    TensorSpec(entry.hf_name, quant.FP8_DTYPE, shape, weight),
    TensorSpec(scale_name, np.float32, scheme.scale_shape(shape), lambda: iter([np.concatenate(scales)])),
  ]


def _locate_state(directory: str) -> tuple[ModelConfig, str, dict[tuple[str, ...], tuple[str, ...]]]:
  """(config, Orbax item dir, our leaf path -> stored leaf path) of a model checkpoint or training workdir."""
  from kimi_jax.checkpoint.model_io import locate_state

  cfg, item_dir, _ = locate_state(directory)
  stored = orbax_arrays.read_tree_paths(item_dir)
  # Training checkpoints split the state into {"params": ..., "rest": ...}.
  names = {p[1:] if p[0] in ("params", "rest") else p: p for p in stored}
  return cfg, item_dir, names
