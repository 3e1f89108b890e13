"""grain input pipeline: documents → tokens → chunks → per-host shard → shuffle → repeat → pack → batch.

Dimension letters: B per-process batch, S sequence (`seq_len`), N corpus tokens, C chunks, L chunk length.

Each document becomes BOS + text + EOS; the whole corpus is tokenized once into `tokens: [N]` with
`next_tokens: [N]`, the token that follows inside the same document (PAD after each document's EOS). Every
document is cut into consecutive chunks of at most S tokens; a chunk is one packed segment with
`inputs = tokens[a:b]`, `targets = next_tokens[a:b]`. So a chunk of S inputs reads S+1 corpus tokens: the
target of its last input is the first input of the next chunk and no target is lost at a cut, while no target
ever crosses a document (it is PAD, masked, at each EOS). One epoch of a process sees each of its chunks once,
i.e. every corpus token exactly once as an input (process_count=1).

Chunks are sharded across processes (chunk c goes to process c % process_count), shuffled (a new permutation
each epoch), repeated forever and packed whole, first-fit, into rows of S (grain's FirstFitPackIterDataset);
the rest of a row is padding.

The returned iterator is a `grain.DatasetIterator`: `get_state()` is a small JSON-able dict and `set_state()`
resumes exactly; `grain.checkpoint.CheckpointHandler` (with `CheckpointSave`/`CheckpointRestore` args) saves it
through an Orbax CheckpointManager. A background thread keeps a few batches ready; the state it reports is
that of the last batch handed out, not of the read-ahead.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import gzip
import pathlib

import grain
import numpy as np

from kimi_jax.data.tokenizer import Tokenizer

CORPUS_PATH = pathlib.Path(__file__).parent / "corpus" / "kjv.txt.gz"
_PREFETCH_BATCHES = 4


def load_corpus() -> list[str]:
  """The embedded corpus (King James Bible, one document per chapter; see corpus/README.md)."""
  return list(_read_corpus())


@functools.cache
def _read_corpus() -> tuple[str, ...]:
  with gzip.open(CORPUS_PATH, "rt", encoding="utf-8") as f:
    return tuple(f.read().rstrip("\n").split("\n\n"))


def tokenize_documents(documents: Sequence[str], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizes every document as BOS + text + EOS.

  Returns:
    tokens: [N] int32, all documents concatenated.
    doc_starts: [num_documents + 1] int64 offsets of each document in `tokens`, then N.
  """
  docs = [np.asarray(tokenizer.encode(d, add_bos=True, add_eos=True), np.int32) for d in documents]
  doc_starts = np.cumsum([0] + [len(d) for d in docs])
  return np.concatenate(docs), doc_starts


@dataclasses.dataclass(frozen=True)
class _Chunks:
  """Random-access source of chunks: index c → {"inputs": [L], "targets": [L]}, 1 ≤ L ≤ S.

  tokens, next_tokens: [N] int32. starts, stops: [C] int64 token offsets of each chunk.
  """

  tokens: np.ndarray
  next_tokens: np.ndarray
  starts: np.ndarray
  stops: np.ndarray

  @classmethod
  def from_tokens(cls, tokens: np.ndarray, doc_starts: np.ndarray, *, seq_len: int, pad_id: int) -> _Chunks:
    next_tokens = np.roll(tokens, -1)
    next_tokens[doc_starts[1:] - 1] = pad_id  # the token after a document's EOS is no target
    lengths = np.diff(doc_starts)
    chunks_per_doc = -(-lengths // seq_len)
    first_chunk = np.cumsum(chunks_per_doc) - chunks_per_doc  # [num_documents]
    chunk_in_doc = np.arange(chunks_per_doc.sum()) - np.repeat(first_chunk, chunks_per_doc)
    starts = np.repeat(doc_starts[:-1], chunks_per_doc) + chunk_in_doc * seq_len
    stops = np.minimum(starts + seq_len, np.repeat(doc_starts[1:], chunks_per_doc))
    return cls(tokens, next_tokens, starts, stops)

  def __len__(self) -> int:
    return len(self.starts)

  def __getitem__(self, c: int) -> dict[str, np.ndarray]:
    span = slice(self.starts[c], self.stops[c])
    return {"inputs": self.tokens[span], "targets": self.next_tokens[span]}


def make_chunk_dataset(
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    seed: int,
    documents: Sequence[str] | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
  """One shuffled epoch of this process's chunks; `.repeat()` reshuffles each further epoch.

  Elements are {"inputs": [L] int32, "targets": [L] int32}, 1 ≤ L ≤ S: a slice of one document and the
  next token of each (PAD after the document's EOS). Chunk c of the whole corpus (in document order) belongs
  to process c % process_count.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, process_count={process_count}), got {process_index}")
  documents = load_corpus() if documents is None else documents
  if not documents:
    raise ValueError("documents is empty")
  tokens, doc_starts = tokenize_documents(documents, tokenizer)
  chunks = _Chunks.from_tokens(tokens, doc_starts, seq_len=seq_len, pad_id=tokenizer.pad_id)
  if len(chunks) < process_count:
    raise ValueError(f"{len(chunks)} chunks cannot be sharded over process_count={process_count}")
  # grain reshuffles epoch e with seed + e; scrambling the user seed keeps seeds s and s+1 from sharing epochs.
  shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
  return grain.MapDataset.source(chunks)[process_index::process_count].shuffle(shuffle_seed)


def make_train_iterator(
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int,
    documents: Sequence[str] | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
  """Endless iterator of packed next-token batches for this process (see the module docstring).

  Args:
    tokenizer: any `Tokenizer`; its BOS/EOS delimit documents and its PAD fills padding.
    seq_len: S. batch_size: B, per process. seed: in [0, 2**32); same seed, same batches.
    documents: texts to train on; defaults to `load_corpus()`.
    process_index, process_count: this host's shard (typically jax.process_index(), jax.process_count()).

  Yields:
    dicts of numpy arrays, all [B, S]:
      inputs: int32 token ids; PAD on padding.
      targets: int32, the next token of the same document; PAD at each document's EOS and on padding.
      segment_ids: int32, 1, 2, ... for the chunks packed into a row, 0 on padding.
      positions: int32, 0, 1, ... restarting at each segment; 0 on padding.
      loss_mask: float32, 1 where targets is a real token: 0 on padding and on each document's last token.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  chunks = make_chunk_dataset(
      tokenizer=tokenizer,
      seq_len=seq_len,
      seed=seed,
      documents=documents,
      process_index=process_index,
      process_count=process_count,
  )
  ds = chunks.repeat().to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  pad = tokenizer.pad_id
  ds = grain.experimental.FirstFitPackIterDataset(
      ds,
      length_struct={"inputs": seq_len, "targets": seq_len},
      num_packing_bins=max(batch_size, 128),  # more bins, less padding: ~1% at S=256, ~6% at S=4096 (KJV)
      shuffle_bins=False,
      padding_struct={"inputs": pad, "targets": pad},
  )
  ds = ds.batch(batch_size, drop_remainder=True).map(functools.partial(_to_model_batch, pad_id=pad))
  return iter(grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=_PREFETCH_BATCHES))


def _to_model_batch(packed: dict[str, np.ndarray], *, pad_id: int) -> dict[str, np.ndarray]:
  """Renames grain's packing outputs (all [B, S]) and derives loss_mask: [B, S] float32."""
  return {
      "inputs": packed["inputs"],
      "targets": packed["targets"],
      "segment_ids": packed["inputs_segment_ids"],
      "positions": packed["inputs_positions"],
      "loss_mask": (packed["targets"] != pad_id).astype(np.float32),
  }
