"""Tests for kimi_jax.data: byte tokenizer, embedded corpus, grain packing pipeline. B batch, S sequence."""

from __future__ import annotations

import itertools
import json
import time

import grain
from helpers.data import TOK, B, S, assert_same_batches, check_batch, reference_chunks, segments
import jax
import numpy as np
import pytest

from kimi_jax.data import pipeline, sources
from kimi_jax.data.batch import DTYPES, Batch


@pytest.fixture(scope="module")
def docs() -> list[str]:
  """41 distinct documents (one empty) of up to ~450 UTF-8 bytes: 145 chunks of S=64."""
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "délta", "εψιλον", "zeta", "日本", "eta"]
  return [f"doc {i}:" + " ".join(rng.choice(words, size=rng.integers(0, 60))) for i in range(40)] + [""]


def epoch_chunks(docs, **kw) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
  """(inputs, targets) of every chunk of one epoch of a process's documents."""
  ds = pipeline.make_document_dataset(sources.TokenizedTexts(docs, TOK), seed=0, **kw)
  split = pipeline.SplitIntoChunks(S, TOK.pad_id)
  return [(tuple(c["inputs"].tolist()), tuple(c["targets"].tolist())) for doc in ds for c in split.flat_map(doc)]


def take(it, n: int) -> list[Batch]:
  return list(itertools.islice(it, n))


def test_byte_tokenizer_round_trip():
  assert (TOK.vocab_size, TOK.bos_id, TOK.eos_id, TOK.pad_id) == (259, 256, 257, 258)
  for text in ["", "In the beginning", "naïve — 日本語 🙂\n\t"]:
    ids = TOK.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id and all(0 <= i < 256 for i in ids[1:-1])
    assert TOK.encode(text) == list(text.encode("utf-8"))
    assert TOK.decode(ids) == text and TOK.decode(np.asarray(ids + [TOK.pad_id])) == text
  assert TOK.decode(TOK.encode("é")[:1] + [ord("x")]) == "\ufffdx"


def test_corpus_is_embedded_public_domain_text():
  docs = sources.load_corpus()
  assert len(docs) == 1189 and docs[0].startswith("Genesis 1\n1 In the beginning God created")
  assert docs[-1].startswith("Revelation 22\n") and all(d and "\n\n" not in d for d in docs)
  assert sum(len(d) for d in docs) >= 2_000_000
  assert sources.CORPUS_PATH.stat().st_size <= 2_000_000


def test_chunks_cover_every_token_once_per_epoch(docs):
  assert sorted(epoch_chunks(docs)) == sorted(reference_chunks(docs, S))


def test_process_shards_are_disjoint_and_cover_one_process(docs):
  """Documents are dealt to processes; each process's batches hold exactly the chunks of its documents."""
  shards = [epoch_chunks(docs, process_index=p, process_count=3) for p in range(3)]
  assert sum(len(s) for s in shards) == len(reference_chunks(docs, S))
  assert sorted(sum(shards, [])) == sorted(epoch_chunks(docs))
  # Each process's batches hold exactly its own shard (several epochs consumed).
  for p, shard in enumerate(shards):
    it = pipeline.make_train_iterator(
      tokenizer=TOK, seq_len=S, batch_size=B, seed=0, documents=docs, process_index=p, process_count=3
    )
    seen = {seg for b in take(it, 60) for seg in segments(b)}
    assert seen == set(shard)


def test_batches_are_packed_segments_of_chunks(docs):
  it = pipeline.make_train_iterator(tokenizer=TOK, seq_len=S, batch_size=B, seed=3, documents=docs)
  batches = take(it, 50)
  for b in batches:
    check_batch(b, B, S)
  segs = [seg for b in batches for seg in segments(b)]
  assert set(segs) == set(reference_chunks(docs, S))  # ~3 epochs: every chunk seen
  assert max(b.segment_ids.max() for b in batches) > 1  # short chunks share rows


def test_real_corpus_batches():
  it = pipeline.make_train_iterator(tokenizer=TOK, seq_len=256, batch_size=8, seed=0)
  for b in take(it, 20):
    check_batch(b, 8, 256)


def test_same_seed_same_batches_other_seed_differs(docs):
  make = lambda seed: pipeline.make_train_iterator(tokenizer=TOK, seq_len=S, batch_size=B, seed=seed, documents=docs)
  first = take(make(7), 40)
  assert_same_batches(first, take(make(7), 40))
  other = take(make(8), 40)
  assert any((x.inputs != y.inputs).any() for x, y in zip(first, other))


@pytest.mark.parametrize("steps", [0, 1, 5, 37])  # 37 batches is past the first epoch
def test_state_restore_continues_exactly(docs, steps):
  make = lambda: pipeline.make_train_iterator(tokenizer=TOK, seq_len=S, batch_size=B, seed=1, documents=docs)
  it = make()
  take(it, steps)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 12)
  restored = make()
  take(restored, 3)  # a used iterator can be rewound too
  restored.set_state(state)
  assert_same_batches(take(restored, 12), expected)


def test_orbax_checkpoint_round_trip(docs, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  make = lambda: pipeline.make_train_iterator(tokenizer=TOK, seq_len=S, batch_size=B, seed=2, documents=docs)
  it = make()
  take(it, 9)
  with ocp.CheckpointManager(tmp_path, item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as mngr:
    mngr.save(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = take(it, 8)
  restored = make()
  with ocp.CheckpointManager(tmp_path, item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as mngr:
    mngr.restore(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert_same_batches(take(restored, 8), expected)


def test_invalid_arguments(docs):
  kw = dict(tokenizer=TOK, seq_len=S, batch_size=B, seed=0, documents=docs)
  for bad in [dict(seq_len=0), dict(batch_size=0), dict(seed=-1), dict(process_index=1), dict(documents=[])]:
    with pytest.raises(ValueError, match=next(iter(bad))):
      pipeline.make_train_iterator(**kw | bad)
  with pytest.raises(ValueError, match="documents or source, not both"):
    pipeline.make_train_iterator(**kw, source=sources.TokenizedTexts(docs, TOK))
  with pytest.raises(ValueError, match="source holds no documents"):
    pipeline.make_train_iterator(**kw | dict(documents=None), source=sources.TokenizedTexts([], TOK))
  with pytest.raises(ValueError, match="41 documents cannot be sharded over process_count=42"):
    pipeline.make_train_iterator(**kw, process_index=0, process_count=42)


def test_throughput_8x256():
  it = pipeline.make_train_iterator(tokenizer=TOK, seq_len=256, batch_size=8, seed=0)
  take(it, 5)
  start = time.perf_counter()
  take(it, 200)
  rate = 200 / (time.perf_counter() - start)
  assert rate >= 50, f"{rate:.0f} batches/s"


def test_batch_abstract_and_unpacked():
  """Batch.abstract gives each field's ShapeDtypeStruct; Batch.unpacked makes whole-row segments."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = Batch.abstract(B, S, sharding)
  assert isinstance(abstract, Batch)
  for x, dtype in zip(abstract, DTYPES):
    assert (x.shape, x.dtype, x.sharding) == ((B, S), dtype, sharding)
  b = Batch.unpacked(np.arange(6).reshape(2, 3), np.arange(1, 7).reshape(2, 3))
  assert [x.dtype for x in b] == list(DTYPES)
  np.testing.assert_array_equal(b.positions, [[0, 1, 2], [0, 1, 2]])
  assert (b.segment_ids == 1).all() and (b.loss_mask == 1).all() and b.targets[1, 2] == 6


def test_sharded_batches_concatenate_streams_field_by_field(docs):
  """ShardedBatches yields a Batch whose rows are its streams' rows, stream after stream."""
  kw = dict(tokenizer=TOK, seq_len=S, seed=0, documents=docs)
  got = next(pipeline.ShardedBatches(num_shards=2, global_batch_size=2 * B, process_index=0, process_count=1, **kw))
  streams = [next(pipeline.make_train_iterator(batch_size=B, process_index=v, process_count=2, **kw)) for v in (0, 1)]
  check_batch(got, 2 * B, S)
  assert_same_batches([Batch(*(x[:B] for x in got)), Batch(*(x[B:] for x in got))], streams)
