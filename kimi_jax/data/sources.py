"""Document sources for the pipeline, and the readers behind them.

A document source is any random-access sequence with `len(source)` and `source[i] -> int32 [L]`: one whole
training document, BOS + text tokens + EOS. Two kinds:

  TokenizedTexts         texts held in memory (the embedded corpus, JSONL / Parquet files), tokenized on access.
  ArrayRecordDocuments   pre-tokenised ArrayRecord shards, as written by `python -m kimi_jax.data.prepare`.

`open_source(spec, tokenizer)` opens one from a config string. Large corpora should be prepared once into
shards: text sources hold every text in memory and re-tokenize each epoch.

Shard format: ArrayRecord files (group_size 1), one record per document holding its tokens as little-endian
int32. A prepared directory also holds metadata.json: the tokenizer's vocabulary size and BOS/EOS/PAD ids, and
each shard's name and document count.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import functools
import glob
import gzip
import json
import os
import pathlib
from typing import Any, Protocol

from array_record.python.array_record_module import ArrayRecordReader
import numpy as np

from kimi_jax.data.tokenizer import Tokenizer

CORPUS_PATH = pathlib.Path(__file__).parent / "corpus" / "kjv.txt.gz"
TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
SHARD_SUFFIX = ".array_record"
METADATA_FILE = "metadata.json"
_RECORD_DTYPE = np.dtype("<i4")


class DocumentSource(Protocol):
  """Random access to token documents: source[i] -> int32 [L], BOS ... EOS."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> np.ndarray: ...


class CorruptShardError(OSError):
  """An ArrayRecord shard that cannot be read, or holds records that are not token documents."""


def load_corpus() -> list[str]:
  """The embedded corpus (King James Bible, one document per chapter; see corpus/README.md)."""
  return list(_read_corpus())


@functools.cache
def _read_corpus() -> tuple[str, ...]:
  with gzip.open(CORPUS_PATH, "rt", encoding="utf-8") as f:
    return tuple(f.read().rstrip("\n").split("\n\n"))


class TokenizedTexts:
  """texts: [N] strings -> source[i]: int32 [L] = BOS + tokenizer.encode(texts[i]) + EOS."""

  def __init__(self, texts: Sequence[str], tokenizer: Tokenizer):
    self.texts = texts
    self.tokenizer = tokenizer

  def __len__(self) -> int:
    return len(self.texts)

  def __getitem__(self, index: int) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(self.texts[index], add_bos=True, add_eos=True), np.int32)


class ArrayRecordDocuments:
  """ArrayRecord shards of token documents, read in order: source[i] -> int32 [L] (record i of all shards).

  Every shard is opened (and checked) up front; a record that cannot be read, is not whole int32s or holds an
  id outside [0, vocab_size) raises CorruptShardError naming the shard and record.
  """

  def __init__(self, paths: Sequence[str], *, vocab_size: int):
    if not paths:
      raise ValueError("no ArrayRecord shards given")
    self.paths = [str(p) for p in paths]
    self.vocab_size = vocab_size
    self._readers = [_open_shard(p) for p in self.paths]
    self._ends = np.cumsum([r.num_records() for r in self._readers])  # [num_shards]

  @classmethod
  def from_dir(cls, directory: str, tokenizer: Tokenizer) -> ArrayRecordDocuments:
    """Opens a directory written by `prepare`, checking that it was tokenized with `tokenizer`'s ids."""
    meta = read_metadata(directory)
    ours = tokenizer_ids(tokenizer)
    theirs = {k: meta.get(k) for k in ours}
    if theirs != ours:
      raise ValueError(f"{directory} was prepared with tokenizer {meta.get('tokenizer')!r} {theirs}, but training "
                       f"uses {ours}; prepare the data again with this tokenizer")
    docs = cls([os.path.join(directory, s["name"]) for s in meta["shards"]], vocab_size=tokenizer.vocab_size)
    for path, shard, n in zip(docs.paths, meta["shards"], np.diff(docs._ends, prepend=0)):
      if n != shard["num_documents"]:
        raise CorruptShardError(f"ArrayRecord shard {path} holds {n} records but {METADATA_FILE} lists "
                                f"{shard['num_documents']}: truncated or replaced")
    return docs

  def __len__(self) -> int:
    return int(self._ends[-1])

  def __getitem__(self, index: int) -> np.ndarray:
    shard = int(np.searchsorted(self._ends, index, side="right"))
    position = index - (int(self._ends[shard - 1]) if shard else 0)
    where = f"ArrayRecord shard {self.paths[shard]}, record {position}"
    try:
      record = self._readers[shard].read([position])[0]
    except RuntimeError as e:  # riegeli: "Corrupted Riegeli/records file: chunk data hash mismatch ..."
      raise CorruptShardError(f"{where}: cannot be read: {e}") from e
    return decode_record(record, vocab_size=self.vocab_size, where=where)


def encode_record(tokens: Sequence[int]) -> bytes:
  """A document's token ids -> one ArrayRecord record (little-endian int32)."""
  return np.asarray(tokens, _RECORD_DTYPE).tobytes()


def decode_record(record: bytes, *, vocab_size: int, where: str) -> np.ndarray:
  """One record -> int32 [L], L >= 1, every id in [0, vocab_size); CorruptShardError naming `where` if not."""
  if not record or len(record) % _RECORD_DTYPE.itemsize:
    raise CorruptShardError(f"{where}: {len(record)} bytes is not a document of int32 tokens")
  tokens = np.frombuffer(record, _RECORD_DTYPE).astype(np.int32)
  bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
  if bad.size:
    raise CorruptShardError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size}) (corrupt, or "
                            "prepared with another tokenizer)")
  return tokens


def tokenizer_ids(tokenizer: Tokenizer) -> dict[str, int]:
  """What shards must agree on with the training tokenizer."""
  return {"vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
          "pad_id": tokenizer.pad_id}


def read_metadata(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} has no {METADATA_FILE}: not written (or not finished) by "
                            "python -m kimi_jax.data.prepare")
  with open(path) as f:
    return json.load(f)


def _open_shard(path: str) -> ArrayRecordReader:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"ArrayRecord shard {path} does not exist")
  reader = ArrayRecordReader(path, "readahead_buffer_size:0")
  if not reader.ok():
    raise CorruptShardError(f"ArrayRecord shard {path} cannot be opened: truncated, or not an ArrayRecord file")
  return reader


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
  """Comma-separated (or listed) paths and globs -> the matching files, each pattern's matches sorted."""
  if isinstance(patterns, str):
    patterns = patterns.split(",")
  paths = []
  for pattern in (p.strip() for p in patterns if p.strip()):
    matches = sorted(glob.glob(pattern))
    if not matches:
      raise FileNotFoundError(f"{pattern!r} matches no file")
    paths += matches
  if not paths:
    raise ValueError(f"no input files in {patterns!r}")
  return paths


def read_texts(path: str, text_field: str = "text") -> Iterator[str]:
  """The documents of a text file: the `text_field` of each JSON line (.jsonl[.gz]) or Parquet row."""
  if path.endswith(".parquet"):
    yield from _parquet_texts(path, text_field)
  elif path.endswith((".jsonl", ".jsonl.gz")):
    yield from _jsonl_texts(path, text_field)
  else:
    raise ValueError(f"{path}: not a text file this pipeline reads ({', '.join(TEXT_SUFFIXES)})")


def count_documents(path: str) -> int:
  """Rows of a Parquet file or non-blank lines of a JSONL file, without parsing them."""
  if path.endswith(".parquet"):
    return _parquet().ParquetFile(path).metadata.num_rows
  with _open_jsonl(path, "rb") as f:
    return sum(1 for line in f if not line.isspace())


def open_source(spec: str, tokenizer: Tokenizer, *, text_field: str = "text") -> DocumentSource:
  """A document source from a config string.

  spec: "corpus" (the embedded corpus); a directory written by `prepare`; or comma-separated files / globs,
  either all ArrayRecord shards (*.array_record) or all text files (*.jsonl, *.jsonl.gz, *.parquet).
  """
  if spec == "corpus":
    return TokenizedTexts(load_corpus(), tokenizer)
  if os.path.isdir(spec):
    return ArrayRecordDocuments.from_dir(spec, tokenizer)
  paths = expand_paths(spec)
  shards = [p.endswith(SHARD_SUFFIX) for p in paths]
  if all(shards):
    return ArrayRecordDocuments(paths, vocab_size=tokenizer.vocab_size)
  if any(shards):
    raise ValueError(f"{spec!r} mixes ArrayRecord shards and text files")
  return TokenizedTexts([text for path in paths for text in read_texts(path, text_field)], tokenizer)


def _open_jsonl(path: str, mode: str):
  return gzip.open(path, mode) if path.endswith(".gz") else open(path, mode)


def _jsonl_texts(path: str, text_field: str) -> Iterator[str]:
  with _open_jsonl(path, "rb") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
      if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
        found = f"fields {sorted(row)}" if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{path}:{lineno}: expected an object with a string {text_field!r} field, got {found}")
      yield row[text_field]


def _parquet_texts(path: str, text_field: str) -> Iterator[str]:
  f = _parquet().ParquetFile(path)
  if text_field not in f.schema_arrow.names:
    raise ValueError(f"{path}: no column {text_field!r} (columns: {f.schema_arrow.names})")
  row = 0
  for batch in f.iter_batches(columns=[text_field]):
    for text in batch.column(0).to_pylist():
      if not isinstance(text, str):
        raise ValueError(f"{path}: row {row}: {text_field!r} is {type(text).__name__}, not a string")
      row += 1
      yield text


def _parquet():
  try:
    import pyarrow.parquet
  except ImportError as e:
    raise ImportError("reading Parquet needs pyarrow: pip install 'kimi-jax[parquet]'") from e
  return pyarrow.parquet
