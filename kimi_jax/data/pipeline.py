"""grain input pipeline: documents → per-host shard → shuffle → repeat → chunks → pack → batch.

Dimension letters: B per-process batch, S sequence (`seq_len`), L document or chunk length.

A document source (see `sources.py`) gives whole documents, int32 [L] = BOS + text + EOS: the embedded corpus,
JSONL / Parquet texts (tokenized as they are read) or pre-tokenised ArrayRecord shards. Document d belongs to
process d % process_count; each process shuffles its documents (a new permutation each epoch) and repeats them
forever.

Each document is cut into consecutive chunks of at most S tokens; a chunk is one packed segment with
`inputs = doc[a:b]`, `targets = next[a:b]`, where `next` is the token that follows inside the document (PAD
after its EOS). So a chunk of S inputs reads S+1 document tokens: the target of its last input is the first
input of the next chunk and no target is lost at a cut, while no target ever crosses a document (it is PAD,
masked, at each EOS). One epoch of a process sees each of its documents' tokens exactly once as an input.

Chunks are packed whole, first-fit, into rows of S (grain's FirstFitPackIterDataset); the rest of a row is
padding. The packer fills at least 128 rows at a time and hands them out in a shuffled order, so the consecutive
chunks of a long document are spread over many batches. Segment ids and positions restart with each chunk and the
model attends only within a segment, so a document's logits do not depend on what is packed beside it
(tests/model/test_packing.py).

The returned iterator is a `grain.DatasetIterator`: `get_state()` is a small JSON-able dict and `set_state()`
resumes exactly; `grain.checkpoint.CheckpointHandler` (with `CheckpointSave`/`CheckpointRestore` args) saves it
through an Orbax CheckpointManager. A background thread keeps a few batches ready; the state it reports is
that of the last batch handed out, not of the read-ahead.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools

import grain
import numpy as np

from kimi_jax.data.batch import Batch
from kimi_jax.data.sources import DocumentSource, TokenizedTexts, load_corpus
from kimi_jax.data.tokenizer import Tokenizer

_PREFETCH_BATCHES = 4


def make_document_dataset(
  source: DocumentSource,
  *,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.MapDataset:
  """One shuffled epoch of this process's documents (each int32 [L]); `.repeat()` reshuffles each epoch.

  Document d of `source` belongs to process d % process_count.
  """
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, process_count={process_count}), got {process_index}")
  if len(source) < process_count:
    raise ValueError(f"{len(source)} documents cannot be sharded over process_count={process_count}")
  return grain.MapDataset.source(source)[process_index::process_count].shuffle(_scramble(seed, 0))


@dataclasses.dataclass(frozen=True)
class SplitIntoChunks(grain.experimental.FlatMapTransform):
  """doc: int32 [L] -> ceil(L / S) chunks {"inputs": [≤S], "targets": [≤S]}, targets = next token (PAD last)."""

  seq_len: int
  pad_id: int

  def flat_map(self, doc: np.ndarray) -> list[dict[str, np.ndarray]]:
    targets = np.append(doc[1:], np.int32(self.pad_id))
    return [
      {"inputs": doc[a : a + self.seq_len], "targets": targets[a : a + self.seq_len]}
      for a in range(0, len(doc), self.seq_len)
    ]


def make_train_iterator(
  *,
  tokenizer: Tokenizer,
  seq_len: int,
  batch_size: int,
  seed: int,
  documents: Sequence[str] | None = None,
  source: DocumentSource | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.DatasetIterator:
  """Endless iterator of packed next-token batches for this process (see the module docstring).

  Args:
    tokenizer: any `Tokenizer`; its BOS/EOS delimit text documents and its PAD fills padding.
    seq_len: S. batch_size: B, per process. seed: in [0, 2**32); same seed, same batches.
    documents: texts to train on. source: a `DocumentSource` (e.g. `sources.open_source(...)`) instead.
      Give at most one; the default is the embedded corpus.
    process_index, process_count: this host's shard (typically jax.process_index(), jax.process_count()).

  Yields:
    `Batch`es of numpy arrays, every field [B, S] (see `kimi_jax.data.batch` for the fields and dtypes).
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if documents is not None and source is not None:
    raise ValueError("give documents or source, not both")
  if source is None:
    source = TokenizedTexts(load_corpus() if documents is None else documents, tokenizer)
  if not len(source):
    raise ValueError("documents is empty" if documents is not None else "source holds no documents")
  docs = make_document_dataset(source, seed=seed, process_index=process_index, process_count=process_count)
  ds = docs.repeat().to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  pad = tokenizer.pad_id
  ds = grain.experimental.FlatMapIterDataset(ds, SplitIntoChunks(seq_len, pad))
  ds = grain.experimental.FirstFitPackIterDataset(
    ds,
    length_struct={"inputs": seq_len, "targets": seq_len},
    num_packing_bins=max(batch_size, 128),  # more bins, less padding: ~1% at S=256, ~6% at S=4096 (KJV)
    seed=_scramble(seed, 1),
    shuffle_bins=True,
    padding_struct={"inputs": pad, "targets": pad},
  )
  ds = ds.batch(batch_size, drop_remainder=True).map(functools.partial(_to_model_batch, pad_id=pad))
  return iter(grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=_PREFETCH_BATCHES))


def _scramble(seed: int, stream: int) -> int:
  """A 32-bit seed for one of the pipeline's shuffles. grain shuffles epoch (or packed group) e with seed + e;
  scrambling the user seed keeps seeds s and s+1 from sharing permutations."""
  return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def _to_model_batch(packed: dict[str, np.ndarray], *, pad_id: int) -> Batch:
  """grain's packing outputs (all [B, S]) as a Batch, with loss_mask [B, S] derived from the targets."""
  return Batch(
    inputs=packed["inputs"],
    targets=packed["targets"],
    segment_ids=packed["inputs_segment_ids"],
    positions=packed["inputs_positions"],
    loss_mask=(packed["targets"] != pad_id).astype(np.float32),
  )


class ShardedBatches:
  """Global batches built from `num_shards` independent streams, each process owning a contiguous range.

  Stream v is `make_train_iterator(..., process_index=v, process_count=num_shards)` with B / num_shards rows
  per batch, so what row r of the global batch holds depends on `num_shards`, not on how many processes
  read it: 1 process × 8 devices and 2 processes × 4 devices train on identical data. Yields this process's
  rows as a `Batch`, [B / process_count, S] per field; `get_state` / `set_state` cover all of its streams.
  """

  def __init__(
    self, *, num_shards: int, global_batch_size: int, process_index: int, process_count: int, **stream_kwargs
  ):
    if num_shards % process_count:
      raise ValueError(f"data_shards={num_shards} is not divisible by the {process_count} processes")
    if global_batch_size % num_shards:
      raise ValueError(f"batch_size={global_batch_size} is not divisible by data_shards={num_shards}")
    per_process = num_shards // process_count
    self._streams = [
      make_train_iterator(
        batch_size=global_batch_size // num_shards, process_index=v, process_count=num_shards, **stream_kwargs
      )
      for v in range(process_index * per_process, (process_index + 1) * per_process)
    ]

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    parts = [next(stream) for stream in self._streams]
    return Batch(*(np.concatenate(field) for field in zip(*parts)))  # each field's rows, stream after stream

  def get_state(self) -> dict:
    return {"streams": [stream.get_state() for stream in self._streams]}

  def set_state(self, state: dict) -> None:
    if len(state["streams"]) != len(self._streams):
      raise ValueError(
        f"checkpointed data state has {len(state['streams'])} streams for this process, the "
        f"config gives {len(self._streams)} (data_shards or the process count changed)"
      )
    for stream, s in zip(self._streams, state["streams"]):
      stream.set_state(s)
