"""Newton–Schulz schedules (quintic, Polar Express, per-step tuples) and the Gram form, against the exact polar
factor U Vᵀ (float64 SVD) and against the plain form.

Errors are RMS over singular directions, ‖O − U Vᵀ‖_F / sqrt(min(m, n)) ("polar error"), or of O against the
exact polynomial U p(Σ) Vᵀ ("poly error": the rounding of the implementation alone). Tolerances are the measured
values (comments) with a margin of about 1.5x.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax import optim

SHAPES = {"square": (2, 96, 96), "tall": (2, 192, 96), "wide": (2, 64, 256), "experts": (2, 3, 64, 128)}


def matrices(shape, spectrum, seed=0):
  """float32 matrices of `shape`: gaussian, or with singular values log-uniform in [1e-3, 1]."""
  rng = np.random.default_rng(seed)
  if spectrum == "gauss":
    return rng.standard_normal(shape).astype(np.float32)
  *batch, m, n = shape
  k = min(m, n)
  u = np.linalg.qr(rng.standard_normal((*batch, m, k)))[0]
  v = np.linalg.qr(rng.standard_normal((*batch, n, k)))[0]
  s = np.exp(rng.uniform(np.log(1e-3), 0.0, (*batch, 1, k)))
  return ((u * s) @ np.swapaxes(v, -1, -2)).astype(np.float32)


def errors(x, out, schedule, norm_scale):
  """(max polar error, max poly error) over the batch."""
  x64 = x.astype(np.float64)
  u, s, vt = np.linalg.svd(x64, full_matrices=False)
  s = s / (np.linalg.norm(x64, axis=(-2, -1))[..., None] * norm_scale + 1e-7)
  for a, b, c in schedule:
    s = a * s + b * s**3 + c * s**5
  k = min(x.shape[-2:]) ** 0.5
  out = np.asarray(out, np.float64)
  polar = np.linalg.norm(out - u @ vt, axis=(-2, -1)) / k
  poly = np.linalg.norm(out - (u * s[..., None, :]) @ vt, axis=(-2, -1)) / k
  return polar.max(), poly.max()


def run(x, coeffs, dtype, gram=False, steps=None):
  return optim.newton_schulz(jnp.asarray(x), steps, coeffs, jnp.dtype(dtype), gram=gram)


# (schedule, spectrum) -> largest polar error measured over SHAPES in float32 (the algorithm's own error).
POLAR_ERR = {
  ("quintic", "gauss"): 0.26,  # measured 0.173 (tall/wide) to 0.237 (square)
  ("quintic", "log"): 0.50,  # measured 0.31-0.44: σ < 0.0052 have not reached the band after 5 steps
  ("polar_express", "gauss"): 0.19,  # measured 0.06-0.12
  ("polar_express", "log"): 0.40,  # measured 0.20-0.29
}
# Polar Express reaches a lower polar error than the quintic with the same 5 steps on every shape and spectrum.


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("spectrum", ["gauss", "log"])
def test_schedules_against_polar_factor(shape, spectrum):
  x = matrices(SHAPES[shape], spectrum)
  polar = {}
  for name in ("quintic", "polar_express"):
    schedule, norm_scale = optim.ns_schedule(name)
    for dtype, poly_tol in (("float32", 2e-5), ("bfloat16", 0.12)):  # bf16 measured ≤ 0.07 (log), ≤ 0.012 (gauss)
      polar_err, poly_err = errors(x, run(x, name, dtype), schedule, norm_scale)
      assert poly_err < poly_tol, (name, dtype, poly_err)
      assert polar_err < POLAR_ERR[name, spectrum] + (0.03 if dtype == "bfloat16" else 0), (name, dtype, polar_err)
      polar[name, dtype] = polar_err
  assert polar["polar_express", "float32"] < polar["quintic", "float32"]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("spectrum", ["gauss", "log"])
@pytest.mark.parametrize("name", ["quintic", "polar_express"])
def test_gram_form_is_the_same_polynomial(shape, spectrum, name):
  x = matrices(SHAPES[shape], spectrum, seed=1)
  schedule, norm_scale = optim.ns_schedule(name)
  plain32, gram32 = run(x, name, "float32"), run(x, name, "float32", gram=True)
  # float32: measured ≤ 2.4e-6 (quintic) and ≤ 5.9e-6 (Polar Express, whose Q reaches ~1/σ_min) apart.
  np.testing.assert_allclose(gram32, plain32, atol=1e-5)
  # bfloat16 with the default restarts (before steps 2 and 4): the same distance from U Vᵀ as the plain form
  # (measured: within +0.0033), and from the exact polynomial at most ~2x the plain form's (measured: gram
  # 0.012-0.087, plain 0.011-0.087; 0.033 vs 0.015 at worst, Polar Express on gaussian experts). With one
  # restart, Dao AI Lab's float16 default, gram measured 0.14 (quintic) to 0.42 (Polar Express) on the log
  # spectrum of a 512×256 matrix, against 0.04-0.06 plain.
  polar_plain, poly_plain = errors(x, run(x, name, "bfloat16"), schedule, norm_scale)
  polar_gram, poly_gram = errors(x, run(x, name, "bfloat16", gram=True), schedule, norm_scale)
  assert polar_gram < polar_plain + 0.005, (polar_gram, polar_plain)
  assert poly_gram < 1.5 * max(poly_plain, 0.03), (poly_gram, poly_plain)


def test_gram_form_without_restarts_breaks_in_bf16():
  """Why GRAM_RESTARTS exists: the accumulated Q ~ R^(-1/2) loses the well-conditioned part in bf16."""
  x = matrices((1, 256, 512), "log")
  schedule, scale = optim.ns_schedule("polar_express")
  y = jnp.asarray(x / (np.linalg.norm(x, axis=(-2, -1), keepdims=True) * scale + 1e-7), jnp.bfloat16)
  _, no_restart = errors(x, optim.gram_newton_schulz(y, schedule, ()).astype(jnp.float32), schedule, scale)
  _, default = errors(x, optim.gram_newton_schulz(y, schedule).astype(jnp.float32), schedule, scale)
  assert no_restart > 1.0 > 0.15 > default  # measured ~29 and ~0.07


def test_per_step_tuples_and_names():
  quintic, scale = optim.ns_schedule("quintic")
  assert quintic == (optim.NS_COEFFS,) * 5 and scale == 1.0
  assert optim.ns_schedule(optim.NS_COEFFS, 3) == ((optim.NS_COEFFS,) * 3, 1.0)
  pe, scale = optim.ns_schedule("polar_express", 10)
  assert scale == 1.01 and pe[:7] == optim.POLAR_EXPRESS_COEFFS[:7] and pe[7:] == ((1.875, -1.25, 0.375),) * 3
  np.testing.assert_allclose(
    pe[0], (8.28721201814563 / 1.01, -23.595886519098837 / 1.01**3, 17.300387312530933 / 1.01**5)
  )
  # Per-step tuples (optax.contrib.muon's ns_coeffs of shape (n, 3)) run exactly those steps.
  x = matrices((2, 32, 48), "gauss")
  steps = ((3.4445, -4.7750, 2.0315), (3.0, -3.2, 1.2), (1.875, -1.25, 0.375))
  explicit = run(x, steps, "float32")
  y = jnp.asarray(x / (np.linalg.norm(x, axis=(-2, -1), keepdims=True) + 1e-7))
  for c in steps:
    y = optim.newton_schulz_step(y, c)
  np.testing.assert_allclose(explicit, y, atol=1e-6)
  np.testing.assert_allclose(run(x, "quintic", "float32"), run(x, optim.NS_COEFFS, "float32"), atol=0)
  with pytest.raises(ValueError, match="per-step"):
    optim.ns_schedule(steps, 5)
  with pytest.raises(ValueError, match="unknown"):
    optim.ns_schedule("cubic")
  with pytest.raises(ValueError, match="unknown"):
    optim.muon_clip(1e-3, ns_coeffs="cubic")


def test_pallas_kernel_runs_per_step_schedules():
  x = matrices((2, 40, 16), "gauss")
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
    want = optim.newton_schulz(jnp.asarray(x), None, "polar_express", dtype, impl="xla", gram=False)
    got = optim.newton_schulz(jnp.asarray(x), None, "polar_express", dtype, impl="pallas", interpret=True)
    np.testing.assert_allclose(got, want, atol=tol)
