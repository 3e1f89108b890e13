"""flash_attention max logits leave padding queries (segment id 0) out, as kimi_jax's XLA attention does.

Dimensions: B batch, S sequence, H heads, Dn / Dr / Dv head dims (Dqk = Dn + Dr; the rope part of k is shared
by heads, so the same inputs also feed kimi_jax's `mla_attention`).
Padding q and k of head 0 are scaled up, so padding·padding logits are that head's largest; the padding
spans several query and key blocks, so the kernels' causal block skipping is exercised.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.layers.attention import mla_attention
import pallas_kernels as pk

B, S, H, DN, DR, DV = 2, 40, 2, 16, 8, 16
SCALE = 0.3
# Interpret mode ignores hardware tile rules; Triton needs dot dims >= 16.
BLOCKS = {"tpu": (16, 8), "gpu": (16, 16), "xla": None}
# Row 0: padding tail over query blocks 1-2 and key blocks 2-4 (tpu); row 1: left padding, then a padding tail.
SEG = np.array([[1] * 14 + [2] * 8 + [0] * 18, [0] * 6 + [3] * 30 + [0] * 4], np.int32)


def _inputs():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(B, S, H, DN + DR)).astype(np.float32)
  k = rng.normal(size=(B, S, H, DN + DR)).astype(np.float32)
  k[..., DN:] = k[:, :, :1, DN:]  # MLA: one rope key for all heads
  v = rng.normal(size=(B, S, H, DV)).astype(np.float32)
  pad = SEG == 0
  q[pad, 0] *= 4.0
  k[pad, 0, :DN] *= 4.0
  return q, k, v


def _max_logits(q, k, seg, causal, count_padding=False):
  """Plain numpy: max scaled logit per head over pairs that are causal, same segment and (unless
  count_padding) whose query is not padding."""
  logits = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k.astype(np.float64)) * SCALE
  mask = seg[:, :, None] == seg[:, None, :]
  if causal:
    mask &= np.tril(np.ones((S, S), bool))[None]
  if not count_padding:
    mask &= (seg != 0)[:, :, None]
  return np.where(mask[:, None], logits, -np.inf).max(axis=(0, 2, 3))


@pytest.mark.parametrize("impl", ["tpu", "gpu", "xla"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_max_logits_leave_padding_out(impl, causal):
  q, k, v = _inputs()
  want = _max_logits(q, k, SEG, causal)
  # The case is only a test if padding holds head 0's largest logit.
  assert _max_logits(q, k, SEG, causal, count_padding=True)[0] > want[0] + 1.0
  kw = dict(segment_ids=jnp.asarray(SEG), causal=causal, softmax_scale=SCALE)
  out, mx = pk.flash_attention(
    *map(jnp.asarray, (q, k, v)), impl=impl, interpret=True, return_max_logits=True, block_sizes=BLOCKS[impl], **kw
  )
  np.testing.assert_allclose(np.asarray(mx), want, rtol=1e-5)
  # The attention output still includes padding rows, as before.
  ref = pk.attention_reference(*map(jnp.asarray, (q, k, v)), **kw)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_numpy_rule_matches_kimi_jax_xla_attention():
  """The rule above is kimi_jax's definition (its XLA path), so qk-clip sees the same numbers on every backend."""
  q, k, v = _inputs()
  _, mx = mla_attention(
    jnp.asarray(q[..., :DN]),
    jnp.asarray(q[..., DN:]),
    jnp.asarray(k[..., :DN]),
    jnp.asarray(k[:, :, 0, DN:]),
    jnp.asarray(v),
    jnp.asarray(SEG),
    scale=SCALE,
    impl="xla",
  )
  np.testing.assert_allclose(np.asarray(mx), _max_logits(q, k, SEG, causal=True), rtol=1e-5)
