"""Packing is invisible to the model: a document's logits do not depend on what is packed beside it.

B batch, S sequence, N packed documents, V vocab.
"""

from __future__ import annotations

from flax import nnx
import numpy as np

from kimi_jax import config
from kimi_jax.data import pipeline
from kimi_jax.data.tokenizer import ByteTokenizer
from kimi_jax.model import KimiK2

TOK = ByteTokenizer()
S, B = 64, 2


@nnx.jit
def logits_fn(model: KimiK2, inputs, positions, segment_ids):
  """inputs, positions, segment_ids: [rows, S] -> logits [rows, S, V]."""
  return model(inputs, positions=positions, segment_ids=segment_ids)[0]


def test_document_logits_do_not_depend_on_packed_neighbours():
  model = KimiK2(config.tiny(dtype="float32"), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  docs = [f"{i}: " + "".join(rng.choice(list("abcdefgh日 "), size=rng.integers(2, 25))) for i in range(12)]
  batch = next(pipeline.make_train_iterator(tokenizer=TOK, seq_len=S, batch_size=B, seed=0, documents=docs))
  seg, pos = batch.segment_ids, batch.positions
  where = [(b, s) for b in range(B) for s in range(1, seg[b].max() + 1)]  # N packed documents
  assert len(where) >= 5, "rows must hold several documents"

  # Rows: the packed batch [B]; each document alone at positions 0.. then padding [N]; and, as a control, the
  # packed batch with one segment per row [B], so attention crosses documents.
  alone = np.full((len(where), S), TOK.pad_id, np.int32)
  alone_seg = np.zeros((len(where), S), np.int32)
  for n, (b, s) in enumerate(where):
    doc = batch.inputs[b][seg[b] == s]
    assert doc[0] == TOK.bos_id and doc[-1] == TOK.eos_id, "whole documents"
    alone[n, : len(doc)], alone_seg[n, : len(doc)] = doc, 1
  alone_pos = np.where(alone_seg > 0, np.arange(S), 0)
  logits = np.asarray(
    logits_fn(
      model,
      np.concatenate([batch.inputs, alone, batch.inputs]),
      np.concatenate([pos, alone_pos, pos]),
      np.concatenate([seg, alone_seg, (seg > 0).astype(np.int32)]).astype(np.int32),
    )
  )  # [B + N + B, S, V]
  packed, single, leaky = logits[:B], logits[B:-B], logits[-B:]

  leak = 0.0
  for n, (b, s) in enumerate(where):
    mask = seg[b] == s
    np.testing.assert_allclose(
      packed[b][mask], single[n][: mask.sum()], rtol=1e-5, atol=1e-5, err_msg=f"row {b}, segment {s}"
    )
    leak = max(leak, np.abs(leaky[b][mask] - single[n][: mask.sum()]).max())
  assert leak > 1e-3, "the control (attention across documents) must change the logits"
