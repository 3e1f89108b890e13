r"""Tokenise JSONL / Parquet text files into ArrayRecord shards of documents for training.

    python -m kimi_jax.data.prepare --input 'data/*.jsonl.gz,more.parquet' --tokenizer PATH/tiktoken.model \
        --output DIR [--shard_size 50000] [--text_field text]

Each document (the `text_field` of a JSON line or Parquet row) becomes one record of int32 tokens, BOS + text +
EOS; shards DIR/tokens-00000.array_record, ... hold --shard_size documents each. DIR/metadata.json, written
last, names the tokenizer and the shards. Train on it with `config.data = DIR` (see `sources.open_source`).

--input, --tokenizer and --output may be gs:// URLs. ArrayRecord writes only local files, so for a bucket each
shard is written into a local temporary directory, uploaded as soon as it is complete and deleted (local disk
holds about one shard); metadata.json is uploaded last, so a prepared directory without it is unfinished.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import json
import os
import shutil
import tempfile
from typing import Any

from absl import app, flags
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from tqdm import tqdm

from kimi_jax import cli_flags  # noqa: F401 (the shared --tokenizer)
from kimi_jax.checkpoint.workdir import as_path, check_bucket, is_url, write_text_atomically
from kimi_jax.data import sources
from kimi_jax.data.tokenizer import Tokenizer, load_tokenizer


class _ShardWriter:
  """Writes records to DIR/tokens-{i:05d}.array_record (DIR local), starting a new shard every `shard_size`
  records; `on_close(name)` is called once each shard is complete."""

  def __init__(self, directory: str, shard_size: int, on_close: Callable[[str], None] = lambda name: None):
    self.directory = directory
    self.shard_size = shard_size
    self.on_close = on_close
    self.shards: list[dict[str, Any]] = []
    self._writer: ArrayRecordWriter | None = None

  def write(self, tokens: list[int]) -> None:
    if self._writer is None or self.shards[-1]["num_documents"] == self.shard_size:
      self.close()
      name = f"tokens-{len(self.shards):05d}{sources.SHARD_SUFFIX}"
      self._writer = ArrayRecordWriter(os.path.join(self.directory, name), "group_size:1")
      if not self._writer.ok():
        raise OSError(f"cannot create {os.path.join(self.directory, name)}")
      self.shards.append({"name": name, "num_documents": 0, "num_tokens": 0})
    self._writer.write(sources.encode_record(tokens))
    self.shards[-1]["num_documents"] += 1
    self.shards[-1]["num_tokens"] += len(tokens)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      self.on_close(self.shards[-1]["name"])


def prepare(
  inputs: str | Sequence[str],
  tokenizer: Tokenizer,
  output_dir: str,
  *,
  tokenizer_name: str,
  shard_size: int = 50_000,
  text_field: str = "text",
  progress: bool = True,
) -> dict[str, Any]:
  """Tokenises every document of `inputs` (paths / globs, local or gs://) into shards in `output_dir` (a directory
  or a gs:// URL); returns the metadata."""
  if shard_size < 1:
    raise ValueError(f"shard_size must be >= 1, got {shard_size}")
  paths = sources.expand_paths(inputs)
  check_bucket(output_dir, write=True)
  output = as_path(output_dir)
  if (output / sources.METADATA_FILE).exists():
    raise FileExistsError(f"{output_dir} already holds prepared shards; choose another --output")
  if is_url(output_dir):
    local = tempfile.mkdtemp(prefix="kimi-jax-prepare-")
    writer = _ShardWriter(local, shard_size, on_close=lambda name: _upload(os.path.join(local, name), output / name))
  else:
    local = None
    output.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(os.fspath(output), shard_size)
  # JSONL objects would be downloaded twice to count them first: the bar then counts without a total.
  counted = all(p.endswith(".parquet") or not is_url(p) for p in paths)
  total = sum(sources.count_documents(p) for p in paths) if counted else None
  num_documents = num_tokens = 0
  try:
    with tqdm(total=total, unit="doc", disable=not progress, dynamic_ncols=True) as bar:
      for path in paths:
        for text in sources.read_texts(path, text_field):
          tokens = tokenizer.encode(text, add_bos=True, add_eos=True)
          writer.write(tokens)
          num_documents, num_tokens = num_documents + 1, num_tokens + len(tokens)
          bar.update()
          if num_documents % 1000 == 0:
            bar.set_postfix(tokens=f"{num_tokens:,}", refresh=False)
  finally:
    try:
      writer.close()  # the last shard, uploaded too (also after an error: without metadata.json nothing reads it)
    finally:
      if local is not None:
        shutil.rmtree(local, ignore_errors=True)
  if not num_documents:
    raise ValueError(f"{inputs!r} holds no documents")
  metadata = {
    "tokenizer": tokenizer_name,
    **sources.tokenizer_ids(tokenizer),
    "dtype": "int32",
    "text_field": text_field,
    "inputs": paths,
    "num_documents": num_documents,
    "num_tokens": num_tokens,
    "shards": writer.shards,
  }
  write_text_atomically(output / sources.METADATA_FILE, json.dumps(metadata, indent=2))
  return metadata


def _upload(local: str, url: epath.Path) -> None:
  """Copies a complete local shard to the bucket (streamed) and deletes it."""
  with open(local, "rb") as src, url.open("wb") as dst:
    shutil.copyfileobj(src, dst, 16 << 20)
  os.remove(local)


# Flags (`python -m kimi_jax.data.prepare`); --tokenizer is shared (kimi_jax/cli_flags.py).
flags.DEFINE_list(
  "input", None, "Text files (local or gs://), comma-separated, globs allowed: .jsonl, .jsonl.gz, .parquet."
)
flags.DEFINE_string("output", None, "Directory (or gs:// URL) for the shards and metadata.json.")
flags.DEFINE_integer("shard_size", 50_000, "Documents per shard.", lower_bound=1)
flags.DEFINE_string("text_field", "text", "JSON field / Parquet column holding each document's text.")


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  meta = prepare(
    f.input,
    load_tokenizer(f.tokenizer),
    f.output,
    tokenizer_name=f.tokenizer,
    shard_size=f.shard_size,
    text_field=f.text_field,
  )
  print(
    f"{meta['num_documents']:,} documents, {meta['num_tokens']:,} tokens in {len(meta['shards'])} shards -> {f.output}"
  )


if __name__ == "__main__":
  flags.mark_flags_as_required(["input", "output"])
  app.run(main)
