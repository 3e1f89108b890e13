"""gmm / tgmm: TPU and GPU Pallas kernels in interpret mode vs the ragged_dot reference.

Dimensions: M rows, K contraction, N output, G local groups, GT all groups.
Shapes are tiny and tiles smaller still, so every case crosses tile boundaries in
M, K and N (interpret mode is slow; real tile sizes are exercised by the AOT test).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.grouped_matmul import metadata, reference

IMPLS = ["tpu", "gpu"]
TILING = (8, 16, 16)  # (tm, tk, tn); interpret mode does not enforce hardware tile rules


def naive_gmm(lhs, rhs, sizes, offset=0):
  """Loop reference in numpy (checks the ragged_dot reference itself)."""
  lhs, rhs, sizes = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64), np.asarray(sizes)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  ends = np.cumsum(sizes)
  for g in range(rhs.shape[0]):
    s, e = ends[offset + g] - sizes[offset + g], ends[offset + g]
    out[s:e] = lhs[s:e] @ rhs[g]
  return out


def _data(m, k, n, g, dtype, seed=0):
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
  rhs = jnp.asarray(rng.normal(size=(g, k, n)) / np.sqrt(k), dtype)
  dout = jnp.asarray(rng.normal(size=(m, n)), dtype)
  return lhs, rhs, dout


def _value_and_grads(impl, lhs, rhs, sizes, dout, **kw):
  """out, dlhs, drhs via a VJP with cotangent dout (one jit: one compile)."""

  @jax.jit
  def run(lhs, rhs, dout):
    f = lambda a, b: pk.gmm(a, b, sizes, impl=impl, **kw)
    out, vjp = jax.vjp(f, lhs, rhs)
    return (out, *vjp(dout.astype(out.dtype)))

  return run(lhs, rhs, dout)


def _assert_close(got, want, tol):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  assert np.all(np.isfinite(got)), "kernel left uninitialised (nan) output"
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


CASES = {
  # name: (M, K, N, group_sizes, G local, group_offset, dtype)
  "empty_groups_ragged_tails_f32": (37, 24, 40, [5, 0, 17, 10, 0], 5, None, jnp.float32),
  "sum_lt_m_bf16": (48, 32, 24, [3, 20, 0, 9], 4, None, jnp.bfloat16),
  "group_offset_f32": (40, 24, 40, [5, 0, 17, 10, 3, 2], 3, 1, jnp.float32),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_gmm_values_and_grads(impl, case):
  m, k, n, sizes, g, offset, dtype = CASES[case]
  sizes = jnp.asarray(sizes, jnp.int32)
  lhs, rhs, dout = _data(m, k, n, g, dtype)
  kw = dict(group_offset=offset, preferred_element_type=jnp.float32)
  got = _value_and_grads(impl, lhs, rhs, sizes, dout, interpret=True, tiling=TILING, **kw)
  want = _value_and_grads("xla", lhs, rhs, sizes, dout, **kw)
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
  for name, a, b in zip(("out", "dlhs", "drhs"), got, want):
    assert a.dtype == b.dtype, name
    _assert_close(a, b, tol)
  # The reference itself against a plain loop.
  np.testing.assert_allclose(np.asarray(want[0]), naive_gmm(lhs, rhs, sizes, offset or 0), rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_gmm_all_groups_empty_and_default_dtype(impl):
  lhs, rhs, _ = _data(24, 16, 16, 3, jnp.bfloat16)
  sizes = jnp.zeros((3,), jnp.int32)
  out = pk.gmm(lhs, rhs, sizes, impl=impl, interpret=True, tiling=TILING)
  assert out.dtype == jnp.bfloat16 and out.shape == (24, 16)
  np.testing.assert_array_equal(np.asarray(out, np.float32), 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_tgmm_matches_reference(impl):
  m, k, n = 40, 24, 16
  sizes = jnp.asarray([7, 0, 20, 5, 8], jnp.int32)
  lhs, _, dout = _data(m, k, n, 1, jnp.float32, seed=1)
  kw = dict(num_groups=3, group_offset=1)
  got = pk.tgmm(lhs, dout, sizes, impl=impl, interpret=True, tiling=TILING, **kw)
  want = pk.tgmm(lhs, dout, sizes, impl="xla", **kw)
  assert got.shape == (3, k, n)
  _assert_close(got, want, 1e-4)
  np.testing.assert_array_equal(np.asarray(got[0]), 0.0)  # group 1 is empty


@pytest.mark.parametrize("impl", IMPLS)
def test_default_tiling_runs(impl):
  lhs, rhs, _ = _data(20, 8, 12, 2, jnp.float32)
  sizes = jnp.asarray([9, 11], jnp.int32)
  out = pk.gmm(lhs, rhs, sizes, impl=impl, interpret=True)
  _assert_close(out, reference.gmm_reference(lhs, rhs, sizes), 1e-4)


def test_auto_is_xla_on_cpu():
  lhs, rhs, _ = _data(10, 4, 6, 2, jnp.float32)
  sizes = jnp.asarray([4, 6], jnp.int32)
  np.testing.assert_array_equal(pk.gmm(lhs, rhs, sizes), jax.lax.ragged_dot(lhs, rhs, sizes))


@pytest.mark.parametrize("seed", range(4))
def test_work_items_partition_rows(seed):
  """Store ranges of the gmm items cover every row exactly once; tiles nondecreasing."""
  rng = np.random.default_rng(seed)
  gt, g, tm, m = 7, 4, 8, 64
  sizes = rng.integers(0, 14, size=gt) * rng.integers(0, 2, size=gt)
  offset = int(rng.integers(0, gt - g + 1))
  bounds = metadata.local_group_bounds(jnp.asarray(sizes, jnp.int32), offset, g, m)
  items = jax.tree.map(np.asarray, metadata.gmm_work_items(bounds, tm=tm, tiles_m=m // tm))
  real = items.kind != 0
  assert real.sum() <= m // tm + g - 1 == len(items.kind)
  assert np.all(np.diff(items.tile) >= 0)
  covered = np.zeros(m, int)
  for lo, hi in zip(items.lo[real], items.hi[real]):
    covered[lo:hi] += 1
  np.testing.assert_array_equal(covered, 1)
  titems = jax.tree.map(np.asarray, metadata.tgmm_work_items(bounds, tm=tm, tiles_m=m // tm))
  assert (titems.first[titems.kind != 0]).sum() == g  # every local group visited once


def test_errors():
  lhs, rhs, _ = _data(10, 4, 6, 2, jnp.float32)
  with pytest.raises(ValueError, match="group_offset"):
    pk.gmm(lhs, rhs, jnp.asarray([4, 3, 3], jnp.int32))
  with pytest.raises(ValueError, match="int32"):
    pk.gmm(lhs, rhs, jnp.asarray([4, 6], jnp.int16))
  with pytest.raises(ValueError, match="impl"):
    pk.gmm(lhs, rhs, jnp.asarray([4, 6], jnp.int32), impl="cuda")


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_gmm_bigger_bf16(impl):
  m, k, n, g = 256, 128, 256, 8
  rng = np.random.default_rng(3)
  sizes = jnp.asarray(rng.multinomial(m - 17, np.ones(g) / g), jnp.int32)
  lhs, rhs, dout = _data(m, k, n, g, jnp.bfloat16)
  tiling = (32, 64, 128)
  got = _value_and_grads(impl, lhs, rhs, sizes, dout, interpret=True, tiling=tiling)
  want = _value_and_grads("xla", lhs, rhs, sizes, dout)
  for a, b in zip(got, want):
    _assert_close(a, b, 5e-2)
