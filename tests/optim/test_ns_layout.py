"""The XLA Newton–Schulz loop's layout work (tall matrices iterated as their transposed copy, the Gram matrix and
products rounded by the dots themselves) changes no arithmetic: it must agree with `newton_schulz_step` and with
the transposed problem bit for bit, and stay as close to the exact polar factor U Vᵀ as before."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax import optim
from kimi_jax.optim import muon


def log_spectrum(m, n, seed=0):
  """An m×n float32 matrix with singular values log-uniform in [1e-3, 1], and its exact polar factor U Vᵀ."""
  rng = np.random.default_rng(seed)
  k = min(m, n)
  u = np.linalg.qr(rng.standard_normal((m, k)))[0]
  v = np.linalg.qr(rng.standard_normal((n, k)))[0]
  x = (u * np.exp(rng.uniform(np.log(1e-3), 0.0, k))) @ v.T
  return x.astype(np.float32), u @ v.T


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_xla_step_matches_newton_schulz_step(dtype):
  x, _ = log_spectrum(64, 128)
  y = jnp.asarray(x / np.linalg.norm(x), dtype)[None]
  ref = jax.jit(muon.newton_schulz_step)(y)
  out = jax.jit(muon._newton_schulz_step_xla)(y)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


@pytest.mark.parametrize("gram", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tall_is_the_transposed_wide(gram, dtype):
  x, _ = log_spectrum(128, 64)
  x = jnp.asarray(np.stack([x, 2 * x]))  # [2, 128, 64]: a stack axis too
  ns = jax.jit(lambda t: optim.newton_schulz(t, dtype=dtype, gram=gram))
  tall = np.asarray(ns(x))
  wide = np.asarray(ns(jnp.swapaxes(x, -1, -2)))
  np.testing.assert_array_equal(tall, np.swapaxes(wide, -1, -2))


@pytest.mark.parametrize("shape", [(512, 256), (256, 512)])
@pytest.mark.parametrize("gram", [False, True])
def test_bf16_orthogonality_error(shape, gram):
  # 0.3992 (Gram) and 0.3996 (plain) measured on the 512×256 matrix of benchmarks/optimizer.py (optax.contrib.muon:
  # 0.4072): K2's quintic ×5 leaves the smallest singular values short of 1, whichever form rounds it.
  x, polar = log_spectrum(*shape)
  out = np.asarray(optim.newton_schulz(jnp.asarray(x), gram=gram), np.float64)
  err = np.linalg.norm(out - polar) / min(shape) ** 0.5
  assert err < 0.41, err
