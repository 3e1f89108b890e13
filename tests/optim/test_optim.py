"""kimi_jax.optim: Newton–Schulz, scale_by_muon, routing, schedules, kimi wiring, import hygiene, errors."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kimi_jax import optim

A_, B_, C_ = optim.NS_COEFFS


def quintic_iterate(sigma, steps=5):
  for _ in range(steps):
    sigma = A_ * sigma + B_ * sigma**3 + C_ * sigma**5
  return sigma


# ---------------------------------------------------------------------------------------------- Newton–Schulz


def test_quintic_band():
  """The band asserted below: p's invariant interval [p(σ*), p(p(σ*))], σ* its local minimum point, is reached
  from every σ in [0.0052, 1] within 5 steps."""
  crit = np.roots([5 * C_, 0, 3 * B_, 0, A_])
  sigma_star = max(r.real for r in crit if abs(r.imag) < 1e-12 and r.real > 0)
  lo = quintic_iterate(sigma_star, 1)
  hi = quintic_iterate(lo, 1)
  np.testing.assert_allclose([sigma_star, lo, hi], [1.0501, 0.6818, 1.1344], atol=1e-4)
  out = quintic_iterate(np.linspace(0.0052, 1.0, 200_001))
  assert out.min() >= lo - 1e-9 and out.max() <= hi + 1e-9


def test_newton_schulz_singular_values_fp32():
  x = jax.random.normal(jax.random.key(0), (3, 48, 96))
  sigma_in = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
  sigma_in /= np.linalg.norm(np.asarray(x, np.float64), axis=(-2, -1))[:, None]
  assert sigma_in.min() > 0.0052  # random rectangular matrices are well inside the band's basin
  out = optim.newton_schulz(x, dtype=jnp.float32)
  sigma_out = np.linalg.svd(np.asarray(out, np.float64), compute_uv=False)
  # NS is an odd matrix polynomial: same singular vectors, each singular value iterated by the scalar quintic.
  np.testing.assert_allclose(sigma_out, -np.sort(-quintic_iterate(sigma_in)), atol=2e-5)
  assert sigma_out.min() >= 0.6818 - 1e-4 and sigma_out.max() <= 1.1344 + 1e-4


def test_newton_schulz_batched_equals_looped_and_tall_is_transposed_wide():
  ns = jax.jit(optim.newton_schulz)
  x = jax.random.normal(jax.random.key(1), (2, 3, 16, 40))
  batched = ns(x)
  looped = jnp.stack([jnp.stack([ns(x[i, j]) for j in range(3)]) for i in range(2)])
  np.testing.assert_array_equal(batched, looped)
  np.testing.assert_array_equal(ns(jnp.swapaxes(x, -1, -2)), jnp.swapaxes(batched, -1, -2))
  assert ns(jnp.zeros((4, 6))).sum() == 0  # eps: zero in, zero out


def test_newton_schulz_bf16_close_to_fp32():
  x = jax.random.normal(jax.random.key(2), (32, 64))
  np.testing.assert_allclose(optim.newton_schulz(x), optim.newton_schulz(x, dtype=jnp.float32), atol=0.02)


def test_newton_schulz_pallas_kernel_matches_xla():
  """The fused kernel (all steps in VMEM; interpret mode here) computes the same iteration as the plain XLA loop
  (which gram="auto" would replace by the Gram form for this 16×40 shape)."""
  x = jax.random.normal(jax.random.key(3), (2, 3, 40, 16))  # tall: the kernel sees the wide transpose
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
    want = optim.newton_schulz(x, dtype=dtype, impl="xla", gram=False)
    got = optim.newton_schulz(x, dtype=dtype, impl="pallas", interpret=True)
    np.testing.assert_allclose(got, want, atol=tol)
  tx = optim.scale_by_muon(ns_dtype=jnp.float32, ns_impl="pallas", ns_interpret=True)
  ref = optim.scale_by_muon(ns_dtype=jnp.float32, ns_impl="xla")
  params = {"w": x}
  got = tx.update(params, tx.init(params))[0]["w"]
  np.testing.assert_allclose(got, ref.update(params, ref.init(params))[0]["w"], atol=1e-5)
  with pytest.raises(ValueError, match="impl must be"):
    optim.newton_schulz(x, impl="triton")


# ---------------------------------------------------------------------------------------------- scale_by_muon


def test_scale_by_muon_rms_batch_axes_and_dtypes():
  params = {"w": jnp.zeros((2, 3, 24, 40), jnp.bfloat16)}
  tx = optim.scale_by_muon(ns_dtype=jnp.float32)
  state = tx.init(params)
  assert state.momentum["w"].dtype == jnp.float32  # momentum kept in float32 for bf16 params
  g = {"w": jax.random.normal(jax.random.key(3), (2, 3, 24, 40)).astype(jnp.bfloat16)}
  u, state = jax.jit(tx.update)(g, state)
  assert u["w"].dtype == jnp.bfloat16
  # First step, Nesterov: M = G and the NS input is (1 + μ)G; each [24, 40] slice is its own matrix.
  expect = 0.2 * 40**0.5 * optim.newton_schulz(1.95 * g["w"].astype(jnp.float32), dtype=jnp.float32)
  np.testing.assert_allclose(u["w"].astype(jnp.float32), expect, atol=2e-3)
  rms = np.sqrt(np.mean(np.square(np.asarray(u["w"], np.float32)), axis=(-2, -1)))
  assert (rms > 0.2 * 0.68).all() and (rms < 0.2 * 1.14).all()  # RMS matching: about rms_scale


def test_scale_by_muon_custom_axes():
  x = jax.random.normal(jax.random.key(4), (24, 5, 40))  # matrix on axes (0, 2), axis 1 a batch axis
  tx = optim.scale_by_muon(ns_dtype=jnp.float32, muon_dims={"w": (0, 2)})
  u, _ = jax.jit(tx.update)({"w": x}, tx.init({"w": x}))
  ref = optim.newton_schulz(1.95 * jnp.moveaxis(x, 1, 0), dtype=jnp.float32) * 0.2 * 40**0.5
  np.testing.assert_allclose(u["w"], jnp.moveaxis(ref, 0, 1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- routing


def test_default_muon_dims_rule():
  params = {
    "tok_embeddings": jnp.zeros((10, 4)),
    "lm_head": {"kernel": jnp.zeros((4, 10))},
    "layers": {
      "attn_norm": {"scale": jnp.zeros((2, 4))},
      "proj": {"kernel": jnp.zeros((2, 4, 4)), "bias": jnp.zeros((2, 4))},
    },
    "w": jnp.zeros((4, 4)),
    "v": jnp.zeros(4),
  }
  assert optim.default_muon_dims(params) == {
    "tok_embeddings": None,
    "lm_head": {"kernel": None},
    "layers": {"attn_norm": {"scale": None}, "proj": {"kernel": (-2, -1), "bias": None}},
    "w": (-2, -1),
    "v": None,
  }


def test_muon_dims_errors_name_the_leaf():
  params = {"a": {"w": jnp.zeros((4, 4))}, "b": jnp.zeros(4)}
  with pytest.raises(ValueError, match=r"'a/w'.*axes \(0, 2\).*shape \(4, 4\)"):
    optim.muon_clip(1e-3, muon_dims={"a": {"w": (0, 2)}, "b": None}).init(params)
  with pytest.raises(ValueError, match=r"'a/w' names the same axis twice"):
    optim.muon_clip(1e-3, muon_dims={"a": {"w": (0, -2)}, "b": None}).init(params)
  with pytest.raises(ValueError, match=r"muon_dims does not match the params tree.*missing from muon_dims: \['b'\]"):
    optim.muon_clip(1e-3, muon_dims={"a": {"w": (0, 1)}}).init(params)
  with pytest.raises(ValueError, match=r"muon_dims entries not in params: \['c'\]"):
    optim.muon_clip(1e-3, muon_dims={"a": {"w": (0, 1)}, "b": None, "c": None}).init(params)


# ---------------------------------------------------------------------------------------------- muon_clip


def test_muon_clip_routes_and_decays():
  params = {"w": jax.random.normal(jax.random.key(5), (8, 16)), "norm": {"scale": jnp.ones(8)}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optim.muon_clip(0.1, weight_decay=0.5, ns_dtype=jnp.float32)
  updates, state = tx.update(grads, tx.init(params), params, max_logits={"ignored": 1.0})
  assert set(state) == {"muon", "adamw", "weight_decay", "learning_rate"}
  muon = optim.scale_by_muon(ns_dtype=jnp.float32)
  direction, _ = muon.update({"w": grads["w"]}, muon.init({"w": params["w"]}))
  np.testing.assert_allclose(updates["w"], -0.1 * (direction["w"] + 0.5 * params["w"]), rtol=1e-6)
  # AdamW, first step: m̂ / (√v̂ + eps) = sign(g) = 1.
  np.testing.assert_allclose(updates["norm"]["scale"], -0.1 * (1.0 + 0.5 * params["norm"]["scale"]), rtol=1e-6)


def test_learning_rate_schedule_is_followed():
  params = {"v": jnp.ones(3)}
  tx = optim.muon_clip(lambda step: 0.1 * (step + 1), weight_decay=0.0)
  state = tx.init(params)
  for step in range(3):
    updates, state = tx.update({"v": jnp.ones(3)}, state, params)
    np.testing.assert_allclose(updates["v"], -0.1 * (step + 1), rtol=1e-6)


def test_warmup_stable_decay():
  sched = optim.warmup_stable_decay(2e-4, warmup=500, stable=1000, decay=2000, final=2e-5)
  steps = np.array([0, 250, 500, 1499, 1500, 2500, 3500, 10_000])
  expect = [0, 1e-4, 2e-4, 2e-4, 2e-4, 2e-5 + 0.5 * 1.8e-4, 2e-5, 2e-5]
  np.testing.assert_allclose(jax.vmap(sched)(steps), expect, rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(optim.warmup_stable_decay(1.0, 0, 0, 0, 0.1)(jnp.arange(2)), [0.1, 0.1])


# ---------------------------------------------------------------------------------------------- kimi wiring


def kimi_params(D=32, L_dense=1, L_moe=2, H=4, Cq=16, Ckv=8, Dn=8, Dr=4, Dv=8, F=48, E=4, Fe=16, Fs=16, V=64):
  """kimi_jax's param tree (see kimi_jax/optim/kimi.py), random, small; a stack with 0 layers is left out."""
  rng = np.random.default_rng(6)

  def w(*shape):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-2]))

  def stack(L, mlp):
    return {
      "attn_norm": {"scale": jnp.ones((L, D))},
      "mlp_norm": {"scale": jnp.ones((L, D))},
      "attn": {
        "q_a": {"kernel": w(L, D, Cq)},
        "q_a_norm": {"scale": jnp.ones((L, Cq))},
        "q_b": {"kernel": w(L, Cq, H * (Dn + Dr))},
        "kv_a": {"kernel": w(L, D, Ckv + Dr)},
        "kv_a_norm": {"scale": jnp.ones((L, Ckv))},
        "kv_b": {"kernel": w(L, Ckv, H * (Dn + Dv))},
        "o": {"kernel": w(L, H * Dv, D)},
      },
      "mlp": mlp,
    }

  def ffn(L, hidden):
    return {"gate": {"kernel": w(L, D, hidden)}, "up": {"kernel": w(L, D, hidden)}, "down": {"kernel": w(L, hidden, D)}}

  params = {"embed": {"embedding": w(V, D)}, "final_norm": {"scale": jnp.ones(D)}, "lm_head": {"kernel": w(D, V)}}
  if L_dense:
    params["dense_layers"] = stack(L_dense, ffn(L_dense, F))
  if L_moe:
    experts = {"gate": w(L_moe, E, D, Fe), "up": w(L_moe, E, D, Fe), "down": w(L_moe, E, Fe, D)}
    mlp = {"router": {"kernel": w(L_moe, D, E)}, "experts": experts, "shared": ffn(L_moe, Fs)}
    params["moe_layers"] = stack(L_moe, mlp)
  return params


def test_kimi_muon_dims_routes_the_table_and_agrees_with_the_default():
  params = kimi_params()
  dims = optim.kimi_muon_dims(params)
  flat = dict(zip(optim._tree.leaf_paths(params), optim.resolve_muon_dims(params, optim.kimi_muon_dims)))
  adamw = sorted(p for p, d in flat.items() if d is None)
  assert adamw == sorted(
    ["embed/embedding", "final_norm/scale", "lm_head/kernel"]
    + [
      f"{stack}/{norm}/scale"
      for stack in ("dense_layers", "moe_layers")
      for norm in ("attn_norm", "mlp_norm", "attn/q_a_norm", "attn/kv_a_norm")
    ]
  )
  assert flat["moe_layers/mlp/experts/gate"] == (2, 3) and flat["moe_layers/mlp/router/kernel"] == (1, 2)
  assert dims == optim.default_muon_dims(params)
  params["moe_layers"]["attn"]["sink"] = jnp.zeros((2, 4))
  with pytest.raises(ValueError, match="moe_layers/attn/sink"):
    optim.kimi_muon_dims(params)


def test_kimi_qk_clip_covers_the_stacks_present():
  spec = optim.kimi_qk_clip(4, 8, 4, 8)
  assert set(spec(kimi_params())) == {"dense_layers", "moe_layers"}
  params = kimi_params(L_dense=0)
  assert set(spec(params)) == {"moe_layers"}
  optim.muon_clip(1e-3, muon_dims=optim.kimi_muon_dims, qk_clip=spec).init(params)  # checks the kernels' layout


def test_kimi_muon_clip_step():
  """A jit'd step on kimi_jax's tree; at lr 0 only qk-clip acts, and only on q_b / kv_b of clipped heads."""
  H, Dn, Dr, Dv, tau = 4, 8, 4, 8, 1.0
  params = kimi_params()
  max_logits = {
    "moe_layers": jnp.array([[0.5, 2.0, 1.0, 4.0], [3.0, 0.1, 0.2, 0.3]]),
    "dense_layers": jnp.array([[2.0, 0.5, 0.5, 0.5]]),
  }
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optim.muon_clip(0.0, muon_dims=optim.kimi_muon_dims, qk_clip=optim.kimi_qk_clip(H, Dn, Dr, Dv), qk_clip_tau=tau)

  @jax.jit
  def step(params, state, max_logits):
    updates, state = tx.update(grads, state, params, max_logits=max_logits)
    return optax.apply_updates(params, updates), state

  new, _ = step(params, tx.init(params), max_logits)
  for path, a, b in zip(optim._tree.leaf_paths(params), jax.tree.leaves(new), jax.tree.leaves(params)):
    if path.endswith(("q_b/kernel", "kv_b/kernel")):
      stack = path.split("/")[0]
      width = Dn + Dr if path.endswith("q_b/kernel") else Dn + Dv
      changed = np.any(np.asarray(a != b).reshape(*a.shape[:-1], H, width), axis=(-3, -1))  # [L, H]
      np.testing.assert_array_equal(changed, max_logits[stack] > tau, err_msg=path)
    else:
      np.testing.assert_array_equal(a, b, err_msg=path)


# ---------------------------------------------------------------------------------------------- packaging


def test_import_needs_only_jax_and_optax():
  heavy = ("flax", "orbax", "grain", "tensorstore", "ml_collections", "torch")
  code = f"import sys, kimi_jax.optim; print(','.join(m for m in {heavy} if m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "", f"kimi_jax.optim pulled in: {out.stdout.strip()}"
