"""Data in a bucket, against a real GCS API server on 127.0.0.1 (the `gcs` fixture, tests/helpers/gcs_server.py): the
tokenizer file, JSONL / Parquet sources (globbed on the bucket) and `prepare` output read from gs:// give exactly what
the same local files give; ArrayRecord shards are read from a local cache that is reused and refreshed; an unfinished
prepared directory and a missing bucket are clear errors; nothing named `gs:` appears on local disk."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import urllib.parse
import urllib.request

from helpers.data import TOK, as_lists, tokens, write_jsonl, write_parquet
from helpers.paths import REPO
from helpers.tokenizer import train_ranks, write_rank_file
import numpy as np
import pytest

from kimi_jax.data import prepare, sources
from kimi_jax.data.tokenizer import load_tokenizer

BUCKET = "kimi-jax-data-test"
MISSING = "gs://kimi-jax-no-such-data-bucket"


def upload(gcs, name: str, data: bytes) -> str:
  """Puts an object through the JSON API directly (not through the code under test); returns its URL."""
  query = urllib.parse.urlencode({"uploadType": "media", "name": name})
  request = urllib.request.Request(f"{gcs.url}/upload/storage/v1/b/{BUCKET}/o?{query}", data=data, method="POST")
  with urllib.request.urlopen(request, timeout=30) as r:
    r.read()
  return f"gs://{BUCKET}/{name}"


def upload_dir(gcs, local: pathlib.Path, prefix: str) -> str:
  for f in sorted(local.iterdir()):
    upload(gcs, f"{prefix}/{f.name}", f.read_bytes())
  return f"gs://{BUCKET}/{prefix}"


@pytest.fixture(scope="module", autouse=True)
def cwd(tmp_path_factory):
  """A fresh current directory for the module: a stray local `gs:` would show up in it."""
  saved = os.getcwd()
  os.chdir(tmp_path_factory.mktemp("cwd"))
  yield pathlib.Path.cwd()
  os.chdir(saved)


@pytest.fixture(scope="module")
def bucket(gcs):
  return gcs.create_bucket(BUCKET)


@pytest.fixture(scope="module")
def docs() -> list[str]:
  """30 distinct documents of up to ~300 UTF-8 bytes, one empty."""
  rng = np.random.default_rng(2)
  words = ["in", "the", "beginning", "naïve", "日本語", "🙂", "<|im_end|>", "\n"]
  return [f"doc {i}: " + " ".join(rng.choice(words, size=rng.integers(0, 50))) for i in range(29)] + [""]


@pytest.fixture(scope="module")
def texts(docs, bucket, gcs, tmp_path_factory) -> pathlib.Path:
  """docs over a.jsonl.gz, b.jsonl.gz and c.parquet, locally and under gs://BUCKET/text/."""
  local = tmp_path_factory.mktemp("text")
  write_jsonl(local / "a.jsonl.gz", docs[:10])
  write_jsonl(local / "b.jsonl.gz", docs[10:18])
  write_parquet(local / "c.parquet", docs[18:])
  upload_dir(gcs, local, "text")
  return local


@pytest.fixture(scope="module")
def rank_file(bucket, gcs, tmp_path_factory) -> tuple[pathlib.Path, str]:
  """A small tiktoken rank file, local and as gs://BUCKET/tiktoken.model."""
  local = write_rank_file(tmp_path_factory.mktemp("tok") / "tiktoken.model", train_ranks())
  return local, upload(gcs, "tiktoken.model", local.read_bytes())


def test_tokenizer_from_the_bucket(rank_file, docs):
  local, url = rank_file
  remote, reference = load_tokenizer(url), load_tokenizer(str(local))
  assert (remote.vocab_size, remote.bos_id, remote.eos_id, remote.pad_id) == (
    reference.vocab_size,
    reference.bos_id,
    reference.eos_id,
    reference.pad_id,
  )
  for text in docs:
    assert remote.encode(text, add_bos=True, add_eos=True) == reference.encode(text, add_bos=True, add_eos=True)
  with pytest.raises(FileNotFoundError, match=f"tokenizer file gs://{BUCKET}/nope.model does not exist"):
    load_tokenizer(f"gs://{BUCKET}/nope.model")


def test_text_files_from_the_bucket(texts, docs, gcs):
  spec = f"gs://{BUCKET}/text/*.jsonl.gz, gs://{BUCKET}/text/c.parquet"
  assert sources.expand_paths(spec) == [f"gs://{BUCKET}/text/{n}" for n in ("a.jsonl.gz", "b.jsonl.gz", "c.parquet")]
  source = sources.open_source(spec, TOK)
  local = sources.open_source(f"{texts}/*.jsonl.gz,{texts}/c.parquet", TOK)
  assert isinstance(source, sources.TokenizedTexts) and source.texts == local.texts == docs
  assert as_lists(source) == [tokens(d) for d in docs]
  assert [sources.count_documents(f"gs://{BUCKET}/text/{n}") for n in ("a.jsonl.gz", "c.parquet")] == [10, 12]
  bad = upload(gcs, "bad/bad.jsonl", b'{"text": "ok"}\n\n{"text": "unterminated\n')
  with pytest.raises(ValueError, match=rf"{bad}:3: invalid JSON"):
    sources.open_source(bad, TOK)
  with pytest.raises(FileNotFoundError, match=rf"'gs://{BUCKET}/text/\*.jsonl' matches no file"):
    sources.open_source(f"gs://{BUCKET}/text/*.jsonl", TOK)


@pytest.fixture(scope="module")
def prepared(texts, rank_file, tmp_path_factory) -> tuple[str, pathlib.Path]:
  """`python -m kimi_jax.data.prepare` from gs:// inputs and tokenizer into gs://BUCKET/prepared (7 documents a
  shard: 5 shards), and the same run into a local directory from the local files."""
  tmp = tmp_path_factory.mktemp("prepare")
  (tmp / "tmp").mkdir()
  url = f"gs://{BUCKET}/prepared"
  env = {**os.environ, "TMPDIR": str(tmp / "tmp")}  # the emulator variables come from the `gcs` fixture
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "kimi_jax.data.prepare",
      f"--input=gs://{BUCKET}/text/*.gz,gs://{BUCKET}/text/c.parquet",
      f"--tokenizer={rank_file[1]}",
      f"--output={url}",
      "--shard_size=7",
    ],
    cwd=pathlib.Path.cwd(),
    env={**env, "PYTHONPATH": str(REPO)},
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(rf"30 documents, [\d,]+ tokens in 5 shards -> {url}", result.stdout), result.stdout
  assert not list((tmp / "tmp").iterdir())  # the local shards were deleted once uploaded
  local = tmp / "local"
  prepare.prepare(
    f"{texts}/*.gz,{texts}/c.parquet",
    load_tokenizer(str(rank_file[0])),
    str(local),
    tokenizer_name=rank_file[1],
    shard_size=7,
    progress=False,
  )
  return url, local


def cached_files(cache: pathlib.Path) -> dict[str, tuple[int, int]]:
  """name -> (inode, mtime in ns) of every file in the cache."""
  return {str(p.relative_to(cache)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.rglob("*") if p.is_file()}


def test_prepared_dir_in_the_bucket(prepared, rank_file, docs, gcs, tmp_path, capsys):
  url, local = prepared
  tok = load_tokenizer(str(rank_file[0]))
  objects = gcs._call("GET", f"/storage/v1/b/{BUCKET}/o?prefix=prepared/")["items"]
  by_time = [o["name"] for o in sorted(objects, key=lambda o: o["timeCreated"])]  # (RFC 3339, one time zone)
  assert by_time == [f"prepared/tokens-{i:05d}.array_record" for i in range(5)] + ["prepared/metadata.json"]
  for i in range(5):  # the same bytes as the local run's shards
    name = f"tokens-{i:05d}.array_record"
    assert gcs.read_object(BUCKET, f"prepared/{name}") == (local / name).read_bytes(), name
  meta = json.loads(gcs.read_object(BUCKET, "prepared/metadata.json"))
  assert meta["shards"] == json.loads((local / "metadata.json").read_text())["shards"]
  nbytes = sum(s.stat().st_size for s in local.glob("*.array_record"))

  cache = tmp_path / "cache"
  source = sources.open_source(url, tok, cache_dir=str(cache))
  expected = as_lists(sources.open_source(str(local), tok))
  assert isinstance(source, sources.ArrayRecordDocuments) and as_lists(source) == expected
  assert expected == [tokens(d, tok) for d in docs]
  assert f"data: copied 5 of 5 shards ({nbytes:,} bytes) from {url} to {cache}/" in capsys.readouterr().out
  (directory,) = cache.iterdir()
  assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in local.iterdir())

  # Opened again: nothing is downloaded; the shards listed as files share the cache.
  before = cached_files(cache)
  assert as_lists(sources.open_source(url, tok, cache_dir=str(cache))) == expected
  assert as_lists(sources.open_source(f"{url}/*.array_record", tok, cache_dir=str(cache))) == expected
  assert capsys.readouterr().out.count("data: copied 0 of 5 shards (0 bytes)") == 2
  after = cached_files(cache)
  assert {k: v for k, v in after.items() if k.endswith(".array_record")} == {
    k: v for k, v in before.items() if k.endswith(".array_record")
  }

  # A cached shard cut short (a full disk, say) is downloaded again, and only it.
  shard = directory / "tokens-00002.array_record"
  shard.write_bytes(shard.read_bytes()[:-10])
  assert as_lists(sources.open_source(url, tok, cache_dir=str(cache))) == expected
  size = (local / shard.name).stat().st_size
  assert f"data: copied 1 of 5 shards ({size:,} bytes)" in capsys.readouterr().out
  assert shard.stat().st_size == size

  # The directory prepared again (metadata.json changed): every shard is downloaded again.
  original = gcs.read_object(BUCKET, "prepared/metadata.json")
  upload(gcs, "prepared/metadata.json", json.dumps({**meta, "tokenizer": "again"}).encode())
  try:
    assert as_lists(sources.open_source(url, tok, cache_dir=str(cache))) == expected
    assert f"data: copied 5 of 5 shards ({nbytes:,} bytes)" in capsys.readouterr().out
  finally:
    upload(gcs, "prepared/metadata.json", original)
  assert not [p for p in cache.rglob("*.tmp")]


def test_default_cache_is_under_kimi_jax_cache(prepared, rank_file, tmp_path, monkeypatch):
  monkeypatch.setenv("KIMI_JAX_CACHE", str(tmp_path))
  source = sources.open_source(prepared[0], load_tokenizer(str(rank_file[0])))
  assert len(source) == 30 and all(p.startswith(f"{tmp_path}/data/") for p in source.paths)


def test_unfinished_or_existing_prepared_dirs(prepared, rank_file, gcs, tmp_path):
  url, local = prepared
  unfinished = upload_dir(gcs, local, "unfinished")
  gcs.delete_object(BUCKET, "unfinished/metadata.json")
  with pytest.raises(FileNotFoundError, match=f"{unfinished} has no metadata.json: not written"):
    sources.open_source(unfinished, TOK, cache_dir=str(tmp_path))
  with pytest.raises(FileExistsError, match=f"{url} already holds prepared shards"):
    prepare.prepare(f"gs://{BUCKET}/text/a.jsonl.gz", TOK, url, tokenizer_name="byte", progress=False)
  with pytest.raises(ValueError, match=rf"{url} was prepared with tokenizer '{rank_file[1]}'"):
    sources.open_source(url, TOK, cache_dir=str(tmp_path))


@pytest.mark.parametrize("what", ["text", "prepared", "shards", "prepare", "tokenizer"])
def test_missing_bucket_is_one_line_naming_the_url(what, gcs, tmp_path):
  url = {
    "text": f"{MISSING}/text/*.jsonl",
    "prepared": f"{MISSING}/prepared",
    "tokenizer": f"{MISSING}/t.model",
    "shards": f"{MISSING}/prepared/tokens-00000.array_record",
    "prepare": f"{MISSING}/out",
  }[what]
  with pytest.raises(FileNotFoundError) as e:
    if what == "tokenizer":
      load_tokenizer(url)
    elif what == "prepare":
      write_jsonl(tmp_path / "a.jsonl", ["x"])
      prepare.prepare(str(tmp_path / "a.jsonl"), TOK, url, tokenizer_name="byte", progress=False)
    else:
      sources.open_source(url, TOK, cache_dir=str(tmp_path))
  message = str(e.value)
  assert url in message and "\n" not in message and "gcloud storage buckets create" in message


def test_no_local_path_named_gs(cwd, tmp_path_factory):
  for root in (cwd, REPO, tmp_path_factory.getbasetemp()):
    assert not (root / "gs:").exists(), root
  assert not list(tmp_path_factory.getbasetemp().rglob("gs:"))
