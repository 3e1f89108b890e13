"""What tests/data and tests/gcs share: the byte tokenizer TOK with the batch shape S, B; independent checks of packed
batches; and writers of JSONL / Parquet text files with their expected token lists."""

from __future__ import annotations

import gzip
import json
import pathlib

import numpy as np
import pytest

from kimi_jax.data.batch import DTYPES, Batch
from kimi_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
S, B = 64, 4  # sequence length, batch size


def reference_chunks(docs: list[str], seq_len: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
  """(inputs, targets) of every chunk, written independently of the pipeline."""
  out = []
  for doc in docs:
    t = TOK.encode(doc, add_bos=True, add_eos=True)
    for a in range(0, len(t), seq_len):
      inputs = t[a : a + seq_len]
      targets = (t[a + 1 : a + seq_len + 1] + [TOK.pad_id])[: len(inputs)]
      out.append((tuple(inputs), tuple(targets)))
  return out


def segments(batch: Batch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
  """(inputs, targets) of every packed segment in a batch."""
  out = []
  for inputs, targets, seg in zip(batch.inputs, batch.targets, batch.segment_ids):
    for s in range(1, seg.max() + 1):
      out.append((tuple(inputs[seg == s].tolist()), tuple(targets[seg == s].tolist())))
  return out


def assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    for name, a, b in zip(Batch._fields, x, y):
      np.testing.assert_array_equal(a, b, err_msg=name)


def check_batch(b: Batch, batch_size: int, seq_len: int) -> None:
  """Every invariant of a packed batch that can be checked from the batch alone."""
  assert isinstance(b, Batch)
  for name, x, dtype in zip(Batch._fields, b, DTYPES):
    assert x.shape == (batch_size, seq_len) and x.dtype == dtype, name
  inputs, targets, seg, pos, mask = b.inputs, b.targets, b.segment_ids, b.positions, b.loss_mask
  pad, eos = seg == 0, inputs == TOK.eos_id
  assert (inputs[pad] == TOK.pad_id).all() and (targets[pad] == TOK.pad_id).all() and (pos[pad] == 0).all()
  assert not (inputs[~pad] == TOK.pad_id).any()
  for row in seg:  # segments are numbered 1, 2, ... from the row's start; padding only at its end
    n = np.count_nonzero(row)
    assert row[0] == 1 and (row[n:] == 0).all() and set(np.diff(row[:n]).tolist()) <= {0, 1}
  cont = (seg[:, 1:] == seg[:, :-1]) & ~pad[:, 1:]  # [B, S-1]: token s+1 continues token s's segment
  first = ~pad & ~np.pad(cont, ((0, 0), (1, 0)))
  last = ~pad & ~np.pad(cont, ((0, 0), (0, 1)))
  # Positions restart at 0 at each segment and count up within it.
  assert (pos[first] == 0).all() and (pos[:, 1:][cont] == pos[:, :-1][cont] + 1).all()
  # Targets are the next inputs within a segment.
  assert (targets[:, :-1][cont] == inputs[:, 1:][cont]).all()
  # loss_mask is 0 exactly on padding and on each document's last token (EOS), whose target is PAD.
  np.testing.assert_array_equal(mask, (~pad & ~eos).astype(np.float32))
  assert (targets[eos] == TOK.pad_id).all() and not (targets[~pad & ~eos] == TOK.pad_id).any()
  # No target crosses a document: EOS ends its segment, BOS is never a target and only starts a segment.
  assert last[eos].all() and not (targets == TOK.bos_id).any() and not (inputs[~first] == TOK.bos_id).any()


def write_jsonl(path: pathlib.Path, texts: list[str], field: str = "text") -> pathlib.Path:
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "wt", encoding="utf-8") as f:
    for i, text in enumerate(texts):
      f.write(json.dumps({"id": i, field: text}, ensure_ascii=False) + "\n" + ("\n" if i % 7 == 3 else ""))
  return path


def write_parquet(path: pathlib.Path, texts: list[str], field: str = "text") -> pathlib.Path:
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq

  pq.write_table(pa.table({field: texts, "n": list(range(len(texts)))}), path, row_group_size=4)
  return path


def tokens(text: str, tok=TOK) -> list[int]:
  return tok.encode(text, add_bos=True, add_eos=True)


def as_lists(source) -> list[list[int]]:
  return [source[i].tolist() for i in range(len(source))]
