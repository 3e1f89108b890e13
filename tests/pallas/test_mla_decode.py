"""mla_decode: TPU and GPU Pallas kernels in interpret mode vs plain attention.

Dimensions: B batch, H heads, C latent rank, R rope dim, T cache length.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk

IMPLS = ["tpu", "gpu"]
B, H, C, R, T = 3, 4, 32, 16, 40


def _inputs(dtype, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), dtype)
  return f(B, H, C), f(B, H, R), f(B, T, C), f(B, T, R)


def naive_decode(ql, qr, cl, cr, lengths, scale):
  """Explicit concatenated-key MQA in numpy (checks the reference too)."""
  ql, qr, cl, cr = (np.asarray(x, np.float64) for x in (ql, qr, cl, cr))
  out = np.zeros(ql.shape)
  for b, n in enumerate(np.asarray(lengths)):
    if n == 0:
      continue
    q = np.concatenate([ql[b], qr[b]], -1)  # [H, C+R]
    k = np.concatenate([cl[b, :n], cr[b, :n]], -1)  # [n, C+R]
    s = q @ k.T * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    out[b] = (p / p.sum(-1, keepdims=True)) @ cl[b, :n]
  return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mla_decode(impl, dtype):
  ql, qr, cl, cr = _inputs(dtype)
  lengths = jnp.asarray([T, 0, 17], jnp.int32)  # full, empty, mid-block
  block = 8 if impl == "tpu" else 16
  got = pk.mla_decode(ql, qr, cl, cr, lengths, 0.2, impl=impl, interpret=True, block_size=block)
  want = pk.mla_decode(ql, qr, cl, cr, lengths, 0.2, impl="xla")
  assert got.shape == (B, H, C) and got.dtype == dtype
  tol = 3e-2 if dtype == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
  np.testing.assert_allclose(
    np.asarray(want, np.float32), naive_decode(ql, qr, cl, cr, lengths, 0.2), rtol=tol, atol=tol
  )
  np.testing.assert_array_equal(np.asarray(got[1], np.float32), 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_mla_decode_default_block_and_padding(impl):
  ql, qr, cl, cr = _inputs(jnp.float32, seed=1)
  lengths = jnp.asarray([1, 39, 25], jnp.int32)
  got = pk.mla_decode(
    ql, qr, cl, cr, lengths, 0.1, impl=impl, interpret=True, block_size=None if impl == "gpu" else 16
  )  # tpu: T=40 padded to 48
  want = pk.mla_decode(ql, qr, cl, cr, lengths, 0.1, impl="xla")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
