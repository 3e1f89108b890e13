"""Document sources for the pipeline, and the readers behind them.

A document source is any random-access sequence with `len(source)` and `source[i] -> int32 [L]`: one whole
training document, BOS + text tokens + EOS. Two kinds:

  TokenizedTexts         texts held in memory (the embedded corpus, JSONL / Parquet files), tokenized on access.
  ArrayRecordDocuments   pre-tokenised ArrayRecord shards, as written by `python -m kimi_jax.data.prepare`.

`HeldOut` splits either into training and held-out documents (config.eval_split) by index.

`open_source(spec, tokenizer)` opens one from a config string. Large corpora should be prepared once into
shards: text sources hold every text in memory and re-tokenize each epoch.

Shard format: ArrayRecord files (group_size 1), one record per document holding its tokens as little-endian
int32. A prepared directory also holds metadata.json: the tokenizer's vocabulary size and BOS/EOS/PAD ids, and
each shard's name and document count.

Buckets: every path may be a gs:// URL (read through etils.epath / gcsfs, which honour STORAGE_EMULATOR_HOST).
Text files are streamed from the bucket and globs are expanded on it. ArrayRecord's reader (C++) opens only local
files, so a prepared directory or shard list in a bucket is first copied into a local cache,
`$KIMI_JAX_CACHE/data/<hash of the URL>` (default `~/.cache/kimi_jax/data/...`, or `cache_dir` of `open_source`),
once, shard by shard, each downloaded under a temporary name and renamed when complete. A later open (or a rerun
after an interrupted copy) reuses the cached shards whose sizes match the objects' and downloads the others; a
prepared directory whose metadata.json changed in the bucket (prepared again) is downloaded afresh. This needs
local disk for the whole corpus. For a corpus larger than that, mount the bucket with gcsfuse
(`gcsfuse --implicit-dirs BUCKET /mnt/BUCKET`) and give the mounted path: it is a plain local path, read in place
without copying.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import functools
import glob
import gzip
import hashlib
import json
import os
import pathlib
import shutil
from typing import IO, Any, Protocol

from array_record.python.array_record_module import ArrayRecordReader
from etils import epath
import numpy as np

from kimi_jax.checkpoint.workdir import as_path, check_bucket, is_url, list_dir, write_text_atomically
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
  id outside [0, vocab_size) raises CorruptShardError naming the shard and record. paths are local files (URLs
  go through `from_urls`); `names` are what errors call them (default: the paths).
  """

  def __init__(self, paths: Sequence[str], *, vocab_size: int, names: Sequence[str] | None = None):
    if not paths:
      raise ValueError("no ArrayRecord shards given")
    self.paths = [str(p) for p in paths]
    self.names = [str(n) for n in names] if names is not None else self.paths
    self.vocab_size = vocab_size
    self._readers = [_open_shard(p, n) for p, n in zip(self.paths, self.names)]
    self._ends = np.cumsum([r.num_records() for r in self._readers])  # [num_shards]

  @classmethod
  def from_urls(
    cls, urls: Sequence[str], *, vocab_size: int, metadata: dict[str, Any] | None = None, cache_dir: str | None = None
  ) -> ArrayRecordDocuments:
    """Shards in a bucket, read from local copies (see the module docstring); errors name the copy and the URL."""
    paths = cache_locally(urls, metadata=metadata, cache_dir=cache_dir)
    return cls(paths, vocab_size=vocab_size, names=[p if p == u else f"{p} (copy of {u})" for p, u in zip(paths, urls)])

  @classmethod
  def from_dir(cls, directory: str, tokenizer: Tokenizer, *, cache_dir: str | None = None) -> ArrayRecordDocuments:
    """Opens a directory written by `prepare` (local, or a URL: copied to `cache_dir`), checking that it was
    tokenized with `tokenizer`'s ids."""
    meta = read_metadata(directory)
    ours = tokenizer_ids(tokenizer)
    theirs = {k: meta.get(k) for k in ours}
    if theirs != ours:
      raise ValueError(
        f"{directory} was prepared with tokenizer {meta.get('tokenizer')!r} {theirs}, but training "
        f"uses {ours}; prepare the data again with this tokenizer"
      )
    if is_url(directory):
      urls = [os.fspath(as_path(directory) / s["name"]) for s in meta["shards"]]
      docs = cls.from_urls(urls, vocab_size=tokenizer.vocab_size, metadata=meta, cache_dir=cache_dir)
    else:
      docs = cls([os.path.join(directory, s["name"]) for s in meta["shards"]], vocab_size=tokenizer.vocab_size)
    for path, shard, n in zip(docs.names, meta["shards"], np.diff(docs._ends, prepend=0)):
      if n != shard["num_documents"]:
        raise CorruptShardError(
          f"ArrayRecord shard {path} holds {n} records but {METADATA_FILE} lists "
          f"{shard['num_documents']}: truncated or replaced"
        )
    return docs

  def __len__(self) -> int:
    return int(self._ends[-1])

  def __getitem__(self, index: int) -> np.ndarray:
    shard = int(np.searchsorted(self._ends, index, side="right"))
    position = index - (int(self._ends[shard - 1]) if shard else 0)
    where = f"ArrayRecord shard {self.names[shard]}, record {position}"
    try:
      record = self._readers[shard].read([position])[0]
    except RuntimeError as e:  # riegeli: "Corrupted Riegeli/records file: chunk data hash mismatch ..."
      raise CorruptShardError(f"{where}: cannot be read: {e}") from e
    return decode_record(record, vocab_size=self.vocab_size, where=where)


class HeldOut:
  """Documents of `source` split by index for evaluation: with `held_out`, every `period`-th document (indices
  period-1, 2·period-1, ...); without, all the others, in their order. Index arithmetic only, so nothing grows with
  the corpus: source[i] -> int32 [L] as `source` gives it."""

  def __init__(self, source: DocumentSource, *, period: int, held_out: bool):
    if period < 2:
      raise ValueError(f"a held-out split needs a period >= 2 (one document in `period`), got {period}")
    self.source, self.period, self.held_out = source, period, held_out

  def __len__(self) -> int:
    held = len(self.source) // self.period
    return held if self.held_out else len(self.source) - held

  def __getitem__(self, index: int) -> np.ndarray:
    if not 0 <= index < len(self):
      raise IndexError(f"document {index} of {len(self)}")
    p = self.period
    return self.source[(index + 1) * p - 1 if self.held_out else index + index // (p - 1)]


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
    raise CorruptShardError(
      f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size}) (corrupt, or "
      "prepared with another tokenizer)"
    )
  return tokens


def tokenizer_ids(tokenizer: Tokenizer) -> dict[str, int]:
  """What shards must agree on with the training tokenizer."""
  return {
    "vocab_size": tokenizer.vocab_size,
    "bos_id": tokenizer.bos_id,
    "eos_id": tokenizer.eos_id,
    "pad_id": tokenizer.pad_id,
  }


def read_metadata(directory: str) -> dict[str, Any]:
  """DIR/metadata.json of a prepared directory (local or URL)."""
  root = as_path(directory)
  if METADATA_FILE not in {p.name for p in list_dir(root)}:  # a fresh listing, not gcsfs's cached one
    raise FileNotFoundError(
      f"{directory} has no {METADATA_FILE}: not written (or not finished) by python -m kimi_jax.data.prepare"
    )
  return json.loads((root / METADATA_FILE).read_text())


def _open_shard(path: str, name: str) -> ArrayRecordReader:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"ArrayRecord shard {name} does not exist")
  reader = ArrayRecordReader(path, "readahead_buffer_size:0")
  if not reader.ok():
    raise CorruptShardError(f"ArrayRecord shard {name} cannot be opened: truncated, or not an ArrayRecord file")
  return reader


def default_cache_dir() -> pathlib.Path:
  """Where shards from buckets are copied: $KIMI_JAX_CACHE/data, default ~/.cache/kimi_jax/data."""
  return pathlib.Path(os.environ.get("KIMI_JAX_CACHE") or "~/.cache/kimi_jax").expanduser() / "data"


def cache_locally(
  urls: Sequence[str], *, metadata: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None
) -> list[str]:
  """Local copies of the files at `urls` (ArrayRecord shards in a bucket) -> their local paths, in order; local
  paths among them are returned as they are.

  The files of one URL directory go into CACHE/<hash of that URL>/ under their own names. A cached file is reused
  when its size equals the object's, else downloaded again, to a temporary name renamed when complete (so an
  interrupted copy resumes with the shards that were complete). `metadata` (the bucket's metadata.json of a
  prepared directory) is cached beside them; when it no longer matches, the directory was prepared again and
  every cached shard is dropped.
  """
  root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  local, copied, nbytes = [], 0, 0
  targets: dict[str, pathlib.Path] = {}  # URL directory -> its local copy
  for url in urls:
    if not is_url(url):
      local.append(url)
      continue
    directory, name = url.rstrip("/").rsplit("/", 1)
    if directory not in targets:
      check_bucket(url)
      target = targets[directory] = root / hashlib.sha256(directory.encode()).hexdigest()[:16]
      meta_copy = target / METADATA_FILE
      if metadata is not None and meta_copy.is_file() and json.loads(meta_copy.read_text()) != metadata:
        shutil.rmtree(target)
      target.mkdir(parents=True, exist_ok=True)
      list_dir(epath.Path(directory))  # one fresh listing, which the sizes below are read from
    source, path = epath.Path(url), targets[directory] / name
    try:
      size = source.stat().length
    except FileNotFoundError:
      raise FileNotFoundError(f"ArrayRecord shard {url} does not exist") from None
    if not (path.is_file() and path.stat().st_size == size):
      partial = path.with_name(f".{name}.{os.getpid()}.tmp")  # per process: the processes of a host may copy at once
      try:
        with source.open("rb") as src, partial.open("wb") as dst:
          shutil.copyfileobj(src, dst, 16 << 20)
      except BaseException:
        partial.unlink(missing_ok=True)
        raise
      partial.replace(path)
      copied, nbytes = copied + 1, nbytes + size
    local.append(str(path))
  if metadata is not None:
    for target in targets.values():
      write_text_atomically(epath.Path(target / METADATA_FILE), json.dumps(metadata, indent=2))
  if targets:
    print(
      f"data: copied {copied} of {sum(map(is_url, urls))} shards ({nbytes:,} bytes) from "
      + ", ".join(f"{d} to {t}" for d, t in targets.items()),
      flush=True,
    )
  return local


def _glob(pattern: str) -> list[str]:
  """The files matching one path / glob, sorted; URLs are globbed on their bucket."""
  if not is_url(pattern):
    return sorted(glob.glob(pattern))
  check_bucket(pattern)
  scheme, rest = pattern.split("://", 1)
  bucket, _, key = rest.partition("/")
  return sorted(os.fspath(p) for p in epath.Path(f"{scheme}://{bucket}").glob(key))


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
  """Comma-separated (or listed) paths and globs (local or gs://) -> the matching files, each pattern's matches
  sorted."""
  if isinstance(patterns, str):
    patterns = patterns.split(",")
  paths = []
  for pattern in (p.strip() for p in patterns if p.strip()):
    matches = _glob(pattern)
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
  """Rows of a Parquet file (from its footer) or non-blank lines of a JSONL file, without parsing them."""
  if path.endswith(".parquet"):
    with as_path(path).open("rb") as f:
      return _parquet().ParquetFile(f).metadata.num_rows
  with _open_jsonl(path) as f:
    return sum(1 for line in f if not line.isspace())


def is_dir(spec: str) -> bool:
  """Whether `spec` names a directory: locally, or (for a URL) a prefix holding objects."""
  if not is_url(spec):
    return os.path.isdir(spec)
  if "," in spec or glob.has_magic(spec):
    return False
  check_bucket(spec)
  return epath.Path(spec).is_dir()


def open_source(
  spec: str, tokenizer: Tokenizer, *, text_field: str = "text", cache_dir: str | None = None
) -> DocumentSource:
  """A document source from a config string.

  spec: "corpus" (the embedded corpus); a directory written by `prepare`; or comma-separated files / globs,
  either all ArrayRecord shards (*.array_record) or all text files (*.jsonl, *.jsonl.gz, *.parquet). Paths may
  be gs:// URLs; ArrayRecord shards in a bucket are copied under `cache_dir` (default $KIMI_JAX_CACHE/data or
  ~/.cache/kimi_jax/data) first, see the module docstring.
  """
  if spec == "corpus":
    return TokenizedTexts(load_corpus(), tokenizer)
  if is_dir(spec):
    return ArrayRecordDocuments.from_dir(spec, tokenizer, cache_dir=cache_dir)
  paths = expand_paths(spec)
  shards = [p.endswith(SHARD_SUFFIX) for p in paths]
  if all(shards):
    if any(map(is_url, paths)):
      return ArrayRecordDocuments.from_urls(paths, vocab_size=tokenizer.vocab_size, cache_dir=cache_dir)
    return ArrayRecordDocuments(paths, vocab_size=tokenizer.vocab_size)
  if any(shards):
    raise ValueError(f"{spec!r} mixes ArrayRecord shards and text files")
  return TokenizedTexts([text for path in paths for text in read_texts(path, text_field)], tokenizer)


@contextlib.contextmanager
def _open_jsonl(path: str) -> Iterator[IO[bytes]]:
  """A JSONL file's bytes, gunzipped if .gz, streamed (local file or object)."""
  with as_path(path).open("rb") as raw:
    if not path.endswith(".gz"):
      yield raw
      return
    with gzip.GzipFile(fileobj=raw) as f:
      yield f


def _jsonl_texts(path: str, text_field: str) -> Iterator[str]:
  with _open_jsonl(path) as f:
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
  parquet = _parquet()
  with as_path(path).open("rb") as raw:  # read by row group: an object is not downloaded whole first
    f = parquet.ParquetFile(raw)
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
