"""flash_attention: TPU and GPU Pallas kernels in interpret mode vs plain XLA attention.

Dimensions: B batch, S sequence, H heads, Dqk / Dv head dims (MLA-like: Dqk != Dv).
S = 40 is not a multiple of the blocks, so padded keys and queries are exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk

IMPLS = ["tpu", "gpu"]
# Interpret mode ignores hardware tile rules; Triton needs dot dims >= 16.
BLOCKS = {"tpu": (16, 8), "gpu": (16, 16)}
B, S, H, DQK, DV = 2, 40, 2, 24, 16


def _inputs(dtype, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(B, S, H, DQK)), dtype)
  k = jnp.asarray(rng.normal(size=(B, S, H, DQK)), dtype)
  v = jnp.asarray(rng.normal(size=(B, S, H, DV)), dtype)
  do = jnp.asarray(rng.normal(size=(B, S, H, DV)), dtype)
  # Several packed segments per row, of uneven lengths (one row starts mid-block).
  seg = jnp.asarray([[0] * 5 + [1] * 20 + [2] * 15, [3] * 13 + [4] * 2 + [5] * 25], jnp.int32)
  return q, k, v, do, seg


def _run(impl, q, k, v, do, **kw):
  """out, max_logits, dq, dk, dv (one jit: one compile). The max-logit cotangent is
  nonzero on purpose: max_logits must carry no gradient."""

  @jax.jit
  def f(q, k, v, do):
    fn = lambda q, k, v: pk.flash_attention(q, k, v, impl=impl, return_max_logits=True, **kw)
    (out, mx), vjp = jax.vjp(fn, q, k, v)
    return (out, mx, *vjp((do, jnp.ones_like(mx))))

  return f(q, k, v, do)


def _check(got, want, tol):
  for name, a, b in zip(("out", "max_logits", "dq", "dk", "dv"), got, want):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a)), name
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal,segments", [(True, True), (False, False)], ids=["causal_segments", "full"])
def test_flash_attention_f32(impl, causal, segments):
  q, k, v, do, seg = _inputs(jnp.float32)
  kw = dict(causal=causal, segment_ids=seg if segments else None, softmax_scale=0.3)
  got = _run(impl, q, k, v, do, interpret=True, block_sizes=BLOCKS[impl], **kw)
  want = _run("xla", q, k, v, do, **kw)
  _check(got, want, 2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_flash_attention_bf16_causal(impl):
  q, k, v, do, _ = _inputs(jnp.bfloat16, seed=1)
  got = _run(impl, q, k, v, do, interpret=True, block_sizes=BLOCKS[impl])
  want = _run("xla", q, k, v, do)
  _check(got, want, 3e-2)


def test_reference_max_logits_and_masking():
  """The reference itself: max logit by brute force (padding queries, segment 0, left out), and segment
  isolation."""
  q, k, v, _, seg = _inputs(jnp.float32, seed=2)
  out, mx = pk.attention_reference(q, k, v, segment_ids=seg, causal=True, softmax_scale=0.5, return_max_logits=True)
  logits = np.einsum("bqhd,bkhd->bhqk", np.asarray(q), np.asarray(k)) * 0.5
  pos = np.arange(S)
  seg_np = np.asarray(seg)
  mask = (pos[:, None] >= pos[None, :])[None] & (seg_np[:, :, None] == seg_np[:, None, :]) & (seg_np != 0)[:, :, None]
  want = np.where(mask[:, None], logits, -np.inf).max(axis=(0, 2, 3))
  np.testing.assert_allclose(np.asarray(mx), want, rtol=1e-5)
  # Changing keys of segment 1 does not change outputs of segment 0 (row 0, first 5).
  k2 = k.at[0, 5:25].set(0.0)
  out2 = pk.attention_reference(q, k2, v, segment_ids=seg, softmax_scale=0.5)
  np.testing.assert_allclose(np.asarray(out2[0, :5]), np.asarray(out[0, :5]), rtol=1e-6)


def test_auto_is_xla_on_cpu_and_shape_errors():
  q, k, v, _, _ = _inputs(jnp.float32)
  np.testing.assert_array_equal(pk.flash_attention(q, k, v), pk.attention_reference(q, k, v))
  with pytest.raises(ValueError, match="segment_ids"):
    pk.flash_attention(q, k, v, segment_ids=jnp.zeros((B, S + 1), jnp.int32))
  with pytest.raises(ValueError, match="expected q, k"):
    pk.flash_attention(q, k[:, :-1], v)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_flash_attention_longer_bf16_segments(impl):
  rng = np.random.default_rng(5)
  b, s, h = 1, 200, 3
  q, k = (jnp.asarray(rng.normal(size=(b, s, h, 48)), jnp.bfloat16) for _ in range(2))
  v, do = (jnp.asarray(rng.normal(size=(b, s, h, 32)), jnp.bfloat16) for _ in range(2))
  seg = jnp.asarray(np.sort(rng.integers(0, 6, size=(b, s)), axis=1), jnp.int32)
  blocks = (32, 64) if impl == "tpu" else (64, 32)
  got = _run(impl, q, k, v, do, segment_ids=seg, interpret=True, block_sizes=blocks)
  want = _run("xla", q, k, v, do, segment_ids=seg)
  _check(got, want, 5e-2)


def test_gpu_head_dim_chunks():
  """The GPU kernels cut Dqk into power-of-two chunks (>= 16) instead of padding it to one power of two."""
  from pallas_kernels.flash_attention.gpu import _chunks

  assert _chunks(192) == [128, 64] and _chunks(128) == [128] and _chunks(576) == [512, 64]
  assert _chunks(24) == [16, 16] and _chunks(8) == [16]  # the last chunk zero-padded
