"""matrix_iteration: the TPU kernel in interpret mode against the plain XLA loop."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.matrix_iteration import matrix_iteration, vmem_bytes


def _step(y):
  """A step with a Gram product, a cube and a cast, like Newton–Schulz's."""
  gram = jnp.matmul(y, jnp.swapaxes(y, -1, -2), preferred_element_type=jnp.float32)
  return (
    1.5 * y.astype(jnp.float32) - 0.5 * jnp.matmul(gram.astype(y.dtype), y, preferred_element_type=jnp.float32)
  ).astype(y.dtype)


@pytest.mark.parametrize("shape", [(3, 16, 40), (1, 24, 24), (2, 8, 130)])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_interpret_matches_xla_loop(shape, dtype, tol):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape)
  x = jnp.asarray(x / np.linalg.norm(x, axis=(1, 2), keepdims=True), dtype)  # spectral norm <= 1: stays bounded
  want = matrix_iteration(x, _step, 4, impl="xla")
  got = matrix_iteration(x, _step, 4, impl="tpu", interpret=True)
  assert got.dtype == dtype and got.shape == shape
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol)
  # Four steps of this Newton iteration move the singular values towards 1: the loop really ran.
  assert float(jnp.max(jnp.abs(want.astype(jnp.float32) - x.astype(jnp.float32)))) > 0.05


def test_errors_and_gpu_fallback():
  with pytest.raises(ValueError, match=r"x must be \[B, m, n\]"):
    matrix_iteration(jnp.ones((4, 4)), _step, 1)
  with pytest.raises(ValueError, match="x has dtype int32"):
    matrix_iteration(jnp.ones((1, 4, 4), jnp.int32), _step, 1)
  x = jnp.eye(4)[None] * 0.5
  np.testing.assert_array_equal(matrix_iteration(x, _step, 2, impl="gpu"), matrix_iteration(x, _step, 2, impl="xla"))
  assert vmem_bytes(256, 512, jnp.bfloat16) < vmem_bytes(256, 512, jnp.float32)
