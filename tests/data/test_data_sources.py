"""Tests for kimi_jax.data.sources and kimi_jax.data.prepare: JSONL / Parquet texts, ArrayRecord shards."""

from __future__ import annotations

import itertools
import json
import pathlib
import shutil
import subprocess
import sys

from array_record.python.array_record_module import ArrayRecordWriter
from helpers.data import (
  TOK,
  B,
  S,
  as_lists,
  assert_same_batches,
  check_batch,
  reference_chunks,
  segments,
  tokens,
  write_jsonl,
  write_parquet,
)
from helpers.paths import REPO
from helpers.tokenizer import kimi_tokenizer
import numpy as np
import pytest

from kimi_jax.data import pipeline, prepare, sources


@pytest.fixture(scope="module")
def docs() -> list[str]:
  """30 distinct documents of up to ~300 UTF-8 bytes, one empty."""
  rng = np.random.default_rng(1)
  words = ["in", "the", "beginning", "naïve", "日本語", "🙂", "<|im_end|>", "\n"]
  return [f"doc {i}: " + " ".join(rng.choice(words, size=rng.integers(0, 50))) for i in range(29)] + [""]


@pytest.fixture(scope="module")
def prepared(docs, tmp_path_factory) -> pathlib.Path:
  """The CLI run on docs split over a .jsonl and a .jsonl.gz file, 7 documents per shard."""
  tmp = tmp_path_factory.mktemp("prepared")
  write_jsonl(tmp / "a.jsonl", docs[:10])
  write_jsonl(tmp / "b.jsonl.gz", docs[10:])
  out = tmp / "out"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "kimi_jax.data.prepare",
      f"--input={tmp}/a.jsonl,{tmp}/*.gz",
      "--tokenizer=byte",
      f"--output={out}",
      "--shard_size=7",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  assert f"30 documents, {sum(len(tokens(d)) for d in docs):,} tokens in 5 shards" in result.stdout
  assert "30/30" in result.stderr  # the progress bar
  return out


def test_jsonl_files_are_sources(docs, tmp_path):
  write_jsonl(tmp_path / "a.jsonl", docs[:10], field="body")
  write_jsonl(tmp_path / "b.jsonl.gz", docs[10:], field="body")
  source = sources.open_source(f"{tmp_path}/*.jsonl, {tmp_path}/*.gz", TOK, text_field="body")
  assert isinstance(source, sources.TokenizedTexts) and as_lists(source) == [tokens(d) for d in docs]
  assert sources.count_documents(str(tmp_path / "a.jsonl")) == 10


def test_parquet_files_are_sources(docs, tmp_path):
  write_parquet(tmp_path / "a.parquet", docs[:10])
  write_parquet(tmp_path / "b.parquet", docs[10:])
  source = sources.open_source(f"{tmp_path}/*.parquet", TOK)
  assert as_lists(source) == [tokens(d) for d in docs]
  assert sources.count_documents(str(tmp_path / "b.parquet")) == 20
  meta = prepare.prepare(f"{tmp_path}/*.parquet", TOK, str(tmp_path / "out"), tokenizer_name="byte", progress=False)
  assert meta["num_documents"] == 30 and as_lists(sources.open_source(str(tmp_path / "out"), TOK)) == as_lists(source)
  with pytest.raises(ValueError, match=r"c.parquet: no column 'text' \(columns: \['body', 'n'\]\)"):
    sources.open_source(str(write_parquet(tmp_path / "c.parquet", ["x"], field="body")), TOK)


def test_text_file_errors(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
  with pytest.raises(
    ValueError,
    match=r"bad.jsonl:2: expected an object with a string 'text' field, got fields "
    r"\['body'\]",
  ):
    sources.open_source(str(bad), TOK)
  bad.write_text('{"text": "ok"}\n\n{"text": "unterminated\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:3: invalid JSON"):
    sources.open_source(str(bad), TOK)
  (tmp_path / "notes.txt").write_text("hi")
  with pytest.raises(ValueError, match=r"notes.txt: not a text file this pipeline reads \(\.jsonl, \.jsonl\.gz"):
    sources.open_source(str(tmp_path / "notes.txt"), TOK)
  with pytest.raises(FileNotFoundError, match=r"'.*/missing\*.jsonl' matches no file"):
    sources.open_source(f"{tmp_path}/missing*.jsonl", TOK)


def test_prepared_shards_feed_the_same_batches(docs, prepared):
  meta = json.loads((prepared / "metadata.json").read_text())
  assert [s["num_documents"] for s in meta["shards"]] == [7, 7, 7, 7, 2]
  assert (meta["vocab_size"], meta["bos_id"], meta["eos_id"], meta["pad_id"]) == (259, 256, 257, 258)
  source = sources.open_source(str(prepared), TOK)
  assert isinstance(source, sources.ArrayRecordDocuments) and as_lists(source) == [tokens(d) for d in docs]
  # Shards listed as files work too (without metadata.json's checks).
  listed = sources.open_source(f"{prepared}/*.array_record", TOK)
  assert as_lists(listed) == as_lists(source)
  # Same documents in the same order: the same batches as training on the texts directly.
  make = lambda **kw: pipeline.make_train_iterator(tokenizer=TOK, seq_len=S, batch_size=B, seed=5, **kw)
  from_shards = list(itertools.islice(make(source=source), 80))  # ~3 epochs
  assert_same_batches(from_shards, list(itertools.islice(make(documents=docs), 80)))
  for b in from_shards:
    check_batch(b, B, S)
  assert {seg for b in from_shards for seg in segments(b)} == set(reference_chunks(docs, S))


def test_kimi_tokenizer_shards(docs, tmp_path):
  tok = kimi_tokenizer(tmp_path)
  write_jsonl(tmp_path / "a.jsonl", docs)
  meta = prepare.prepare(
    str(tmp_path / "a.jsonl"),
    tok,
    str(tmp_path / "out"),
    tokenizer_name="tiktoken.model",
    shard_size=100,
    progress=False,
  )
  assert meta["num_documents"] == 30 and meta["num_tokens"] < sum(len(tokens(d)) for d in docs)
  source = sources.open_source(str(tmp_path / "out"), tok)
  assert as_lists(source) == [tokens(d, tok) for d in docs]
  it = pipeline.make_train_iterator(tokenizer=tok, seq_len=32, batch_size=2, seed=0, source=source)
  batches = list(itertools.islice(it, 10))
  inputs, seg = np.stack([b.inputs for b in batches]), np.stack([b.segment_ids for b in batches])
  assert inputs.max() < tok.vocab_size and (inputs == tok.bos_id).any() and (inputs[seg == 0] == tok.pad_id).all()
  with pytest.raises(
    ValueError,
    match=r"out was prepared with tokenizer 'tiktoken.model' .* but training uses "
    r"\{'vocab_size': 259",
  ):
    sources.open_source(str(tmp_path / "out"), TOK)
  with pytest.raises(FileExistsError, match="already holds prepared shards"):
    prepare.prepare(str(tmp_path / "a.jsonl"), tok, str(tmp_path / "out"), tokenizer_name="t", progress=False)


def corrupt_copy(prepared: pathlib.Path, tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  out = tmp_path / "copy"
  shutil.copytree(prepared, out)
  return out, out / "tokens-00001.array_record"


def test_corrupt_shard_is_a_clear_error(prepared, tmp_path):
  out, shard = corrupt_copy(prepared, tmp_path)
  data = bytearray(shard.read_bytes())
  data[100:400] = bytes(b ^ 0xFF for b in data[100:400])  # inside the records
  shard.write_bytes(bytes(data))
  with pytest.raises(sources.CorruptShardError, match=rf"ArrayRecord shard {shard}, record \d: cannot be read"):
    as_lists(sources.open_source(str(out), TOK))
  # The training iterator raises the same error when it reaches the shard.
  it = pipeline.make_train_iterator(
    tokenizer=TOK, seq_len=S, batch_size=B, seed=0, source=sources.open_source(str(out), TOK)
  )
  with pytest.raises(sources.CorruptShardError, match=str(shard)):
    list(itertools.islice(it, 100))


def test_truncated_or_replaced_shards_are_clear_errors(prepared, tmp_path):
  out, shard = corrupt_copy(prepared, tmp_path)
  shard.write_bytes(shard.read_bytes()[:-100])
  with pytest.raises(sources.CorruptShardError, match=rf"ArrayRecord shard {shard} cannot be opened: truncated"):
    sources.open_source(str(out), TOK)
  shutil.copy(out / "tokens-00004.array_record", shard)  # a valid shard, but not the one metadata.json lists
  with pytest.raises(sources.CorruptShardError, match=rf"{shard} holds 2 records but metadata.json lists 7"):
    sources.open_source(str(out), TOK)
  shard.write_bytes(b"not an array record")
  with pytest.raises(sources.CorruptShardError, match=str(shard)):
    sources.open_source(str(shard), TOK)
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=rf"shard {shard} does not exist"):
    sources.open_source(str(out), TOK)
  (out / "metadata.json").unlink()
  with pytest.raises(FileNotFoundError, match="has no metadata.json"):
    sources.open_source(str(out), TOK)


def test_records_that_are_not_documents(tmp_path):
  path = str(tmp_path / "bad.array_record")
  writer = ArrayRecordWriter(path, "group_size:1")
  for record in [sources.encode_record([256, 65, 257]), sources.encode_record([256, 300, 257]), b"abc"]:
    writer.write(record)
  writer.close()
  source = sources.open_source(path, TOK)
  assert source[0].tolist() == [256, 65, 257]
  with pytest.raises(sources.CorruptShardError, match=r"record 1: token id 300 is outside the vocabulary \[0, 259\)"):
    source[1]
  with pytest.raises(sources.CorruptShardError, match=r"record 2: 3 bytes is not a document of int32 tokens"):
    source[2]


def test_mixed_sources_are_rejected(prepared, tmp_path):
  write_jsonl(tmp_path / "a.jsonl", ["x"])
  with pytest.raises(ValueError, match="mixes ArrayRecord shards and text files"):
    sources.open_source(f"{prepared}/*.array_record,{tmp_path}/a.jsonl", TOK)
  assert len(sources.open_source("corpus", TOK)) == 1189


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(ImportError, match=r"reading Parquet needs pyarrow: pip install 'kimi-jax\[parquet\]'"):
    list(sources.read_texts(str(tmp_path / "a.parquet")))
