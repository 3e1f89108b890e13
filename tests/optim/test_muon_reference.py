"""muon_clip (qk-clip off) against trajectories from torch.optim.Muon / torch.optim.AdamW.

The fixture is made by tests/reference/make_muon_fixture.py (see its docstring for what torch does and how to
regenerate it). Muon leaves: a tall and a wide matrix; AdamW leaf: a vector.
"""

from helpers.paths import MUON_TORCH
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kimi_jax.optim import muon_clip


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(MUON_TORCH))


def run(ref, ns_dtype, nesterov=True, ns_gram=False):
  """{leaf: [T, ...] params after each step} for muon_clip fed the fixture's gradients."""
  tx = muon_clip(
    float(ref["lr"]),
    weight_decay=float(ref["weight_decay"]),
    momentum=float(ref["momentum"]),
    nesterov=nesterov,
    ns_dtype=ns_dtype,
    adam_b1=float(ref["adam_b1"]),
    adam_b2=float(ref["adam_b2"]),
    qk_clip_tau=None,
    ns_gram=ns_gram,
  )
  names = ("tall", "wide", "vec")
  params = {n: jnp.asarray(ref[f"{n}_w0"]) for n in names}
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  out = {n: [] for n in names}
  for t in range(ref["tall_grads"].shape[0]):
    params, state = step(params, state, {n: jnp.asarray(ref[f"{n}_grads"][t]) for n in names})
    for n in names:
      out[n].append(np.asarray(params[n]))
  return {n: np.stack(v) for n, v in out.items()}


def test_fixture_is_small_and_fp32_differs_from_bf16(ref):
  assert MUON_TORCH.stat().st_size < 200_000
  # The fp32 monkeypatch took effect: bf16 Newton–Schulz moves the trajectory visibly.
  assert np.abs(ref["tall_fp32"] - ref["tall_bf16"]).max() > 1e-4


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_fp32_matches_torch(ref, nesterov):
  ours = run(ref, jnp.float32, nesterov)
  suffix = "fp32" if nesterov else "fp32_plain"
  for name in ("tall", "wide"):
    np.testing.assert_allclose(ours[name], ref[f"{name}_{suffix}"], rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("ns_gram", [False, True])
def test_muon_bf16_matches_torch_loosely(ref, ns_gram):
  ours = run(ref, jnp.bfloat16, ns_gram=ns_gram)
  for name in ("tall", "wide"):
    # bf16 (8-bit mantissa) Newton–Schulz perturbs each update by ~1%, differently in torch and XLA: allow 5% of
    # how far the params have moved by each step (torch's own bf16-vs-fp32 gap is ~1.5%).
    moved = np.abs(ref[f"{name}_bf16"] - ref[f"{name}_w0"]).max(axis=(1, 2))
    err = np.abs(ours[name] - ref[f"{name}_bf16"]).max(axis=(1, 2))
    assert (err < 0.05 * moved).all(), (name, err, moved)


def test_adamw_branch_matches_torch(ref):
  ours = run(ref, jnp.float32)
  np.testing.assert_allclose(ours["vec"], ref["vec_adamw"], rtol=0, atol=1e-6)


def test_gram_form_matches_torch_in_fp32(ref):
  """The Gram form with the same quintic schedule is the same polynomial: it stays within the plain form's
  tolerance of torch.optim.Muon (the wide and tall fixture matrices both take it)."""
  ours = run(ref, jnp.float32, ns_gram=True)
  for name in ("tall", "wide"):
    np.testing.assert_allclose(ours[name], ref[f"{name}_fp32"], rtol=0, atol=1e-6, err_msg=name)
