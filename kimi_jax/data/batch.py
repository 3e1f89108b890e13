"""The training batch: what the data pipeline yields and the train step reads.

Dimension letters: B batch (per process as the pipeline yields it, global in the train step), S sequence.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np


class Batch(NamedTuple):
  """Packed next-token rows, every field [B, S]. A NamedTuple, so a pytree: jax.tree.map, device_put and jit
  take it whole.

  inputs: int32 token ids; PAD on padding.
  targets: int32, the next token of the same document; PAD at each document's EOS and on padding.
  segment_ids: int32, 1, 2, ... for the chunks packed into a row, 0 on padding; attention stays within a segment.
  positions: int32, 0, 1, ... restarting at each segment; 0 on padding.
  loss_mask: float32, 1 where targets is a real token: 0 on padding and on each document's last token.
  """

  inputs: Any
  targets: Any
  segment_ids: Any
  positions: Any
  loss_mask: Any

  @classmethod
  def abstract(cls, batch_size: int, seq_len: int, sharding: jax.sharding.Sharding | None = None) -> Batch:
    """The batch's ShapeDtypeStructs, [batch_size, seq_len] each, laid out by `sharding` (for lowering the train
    step without data)."""
    return jax.tree.map(lambda dtype: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=sharding), DTYPES)

  @classmethod
  def unpacked(cls, inputs: Any, targets: Any) -> Batch:
    """Rows without packing: each row of inputs / targets [B, S] is one segment at positions 0..S-1, and every
    target counts in the loss (synthetic batches for benchmarks and tests)."""
    inputs, targets = np.asarray(inputs, DTYPES.inputs), np.asarray(targets, DTYPES.targets)
    b, s = inputs.shape
    return cls(
      inputs=inputs,
      targets=targets,
      segment_ids=np.ones((b, s), DTYPES.segment_ids),
      positions=np.tile(np.arange(s, dtype=DTYPES.positions), (b, 1)),
      loss_mask=np.ones((b, s), DTYPES.loss_mask),
    )


DTYPES = Batch(
  inputs=np.dtype(np.int32),
  targets=np.dtype(np.int32),
  segment_ids=np.dtype(np.int32),
  positions=np.dtype(np.int32),
  loss_mask=np.dtype(np.float32),
)  # each field's dtype
