"""qk-clip: recompute the max logits of small MHA / GQA / MLA attentions after a clip-only (lr 0) update.

Letters: L layers (leading batch axis), S sequence, D model, H query heads, G kv heads, Dh head dim,
Cq / Ckv q / kv latent ranks, Dn / Dr / Dv MLA nope / rope / value head dims.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kimi_jax import optim

L, S, D, H = 2, 12, 16, 4


def causal_max(scores):
  """scores [..., H, S, S] -> [..., H] max over causal (key <= query) pairs."""
  mask = np.tril(np.ones((S, S), bool))
  return np.where(mask, scores, -np.inf).max(axis=(-2, -1))


def heads(y, n):
  """[..., S, n·W] -> [..., S, n, W]."""
  return y.reshape(*y.shape[:-1], n, -1)


def mha_max_logits(p, x, G, Dh):
  """x [..., S, D], q [..., D, H·Dh], k [..., D, G·Dh] -> [..., H] (in float64)."""
  q = heads(x @ np.asarray(p["q"], np.float64), H)
  k = np.repeat(heads(x @ np.asarray(p["k"], np.float64), G), H // G, axis=-2)  # head h reads kv head h // (H/G)
  return causal_max(np.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(Dh))


def mla_max_logits(p, c_q, x, Dn, Dr):
  """c_q [..., S, Cq] (normed q latent), x [..., S, D] -> [..., H]: scaled q_nope·k_nope + q_rope·k_rope.

  RoPE is left out: it rotates q_rope and k_rope linearly, so it cannot change how the clip scales a logit.
  """
  q = heads(c_q @ np.asarray(p["q_b"], np.float64), H)  # [..., S, H, Dn + Dr]
  kv_a = x @ np.asarray(p["kv_a"], np.float64)
  latent, k_rope = kv_a[..., :-Dr], kv_a[..., -Dr:]  # [..., S, Ckv], [..., S, Dr] shared by all heads
  k_nope = heads(latent @ np.asarray(p["kv_b"], np.float64), H)[..., :Dn]
  scores = np.einsum("...qhd,...khd->...hqk", q[..., :Dn], k_nope)
  scores += np.einsum("...qhd,...kd->...hqk", q[..., Dn:], k_rope)
  return causal_max(scores / np.sqrt(Dn + Dr))


def rand(rng, *shape, scale=1.0):
  return (rng.standard_normal(shape) * scale).astype(np.float32)


def clip_only_step(params, spec, max_logits, tau):
  """One muon_clip update at learning rate 0 (so only qk-clip moves anything); returns the new params."""
  tx = optim.muon_clip(0.0, qk_clip=spec, qk_clip_tau=tau, ns_dtype=jnp.float32)
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  updates, _ = jax.jit(lambda s: tx.update(grads, s, params, max_logits=max_logits))(tx.init(params))
  return jax.tree.map(np.asarray, optax.apply_updates(params, updates))


def head_cols(w, width):
  """w [..., X, heads·width] -> [..., X, heads, width]."""
  return w.reshape(*w.shape[:-1], -1, width)


@pytest.mark.parametrize("G", [H, 2])
def test_mha_gqa_clip_lands_on_tau(G):
  Dh = 8
  rng = np.random.default_rng(0)
  head_gain = np.repeat(np.array([0.5, 1.5, 0.7, 2.0], np.float32), Dh)  # spread the heads' logits
  params = {
    "attn": {"q": rand(rng, L, D, H * Dh) * head_gain, "k": rand(rng, L, D, G * Dh), "o": rand(rng, L, H * Dh, D)},
    "norm": {"scale": np.ones((L, D), np.float32)},
  }
  x = rng.standard_normal((L, S, D))
  before = mha_max_logits(params["attn"], x, G, Dh)
  tau = float(np.median(before))
  clipped = before > tau
  assert 0 < clipped.sum() < clipped.size
  spec = {"attn": optim.mha_qk_clip("attn/q", ("attn", "k"), num_heads=H, head_dim=Dh, num_kv_heads=G)}
  new = clip_only_step(params, spec, {"attn": jnp.asarray(before, jnp.float32)}, tau)

  after = mha_max_logits(new["attn"], x, G, Dh)
  np.testing.assert_allclose(after, np.minimum(before, tau), rtol=2e-6)  # clipped → τ, the rest unchanged
  np.testing.assert_array_equal(new["attn"]["o"], params["attn"]["o"])
  np.testing.assert_array_equal(new["norm"]["scale"], params["norm"]["scale"])
  # Weights: with MHA every unclipped head is untouched; with GQA every head of a group with no clipped head.
  untouched_q = ~clipped if G == H else np.repeat(~clipped.reshape(L, G, -1).any(-1), H // G, axis=1)
  untouched_k = ~clipped.reshape(L, G, -1).any(-1)
  for name, untouched in (("q", untouched_q), ("k", untouched_k)):
    same = (head_cols(new["attn"][name], Dh) == head_cols(params["attn"][name], Dh)).all(axis=(-3, -1))  # [L, heads]
    np.testing.assert_array_equal(same, untouched, err_msg=name)


@pytest.mark.parametrize("layer_axis", [True, False])
def test_mla_clip_lands_on_tau(layer_axis):
  Cq, Ckv, Dn, Dr, Dv = 12, 10, 8, 4, 6
  rng = np.random.default_rng(1)
  head_gain = np.repeat(np.array([0.4, 1.0, 1.6, 2.2], np.float32), Dn + Dr)
  params = {
    "attn": {
      "q_b": rand(rng, L, Cq, H * (Dn + Dr)) * head_gain,
      "kv_a": rand(rng, L, D, Ckv + Dr),
      "kv_b": rand(rng, L, Ckv, H * (Dn + Dv)),
    },
    "embed": {"embedding": rand(rng, 20, D)},
  }
  c_q, x = rng.standard_normal((L, S, Cq)), rng.standard_normal((L, S, D))
  if not layer_axis:  # one layer: kernels [X, Y], logits [H]
    params, c_q, x = jax.tree.map(lambda a: a[0], (params, c_q, x))
  before = mla_max_logits(params["attn"], c_q, x, Dn, Dr)  # [(L,) H]
  tau = float(np.median(before))
  clipped = before > tau
  assert clipped.any() and not clipped.all()
  rule = optim.mla_qk_clip(
    "attn/q_b", "attn/kv_b", num_heads=H, qk_nope_head_dim=Dn, qk_rope_head_dim=Dr, v_head_dim=Dv
  )
  new = clip_only_step(params, {"mla": rule}, {"mla": jnp.asarray(before, jnp.float32)}, tau)

  np.testing.assert_allclose(mla_max_logits(new["attn"], c_q, x, Dn, Dr), np.minimum(before, tau), rtol=2e-6)
  np.testing.assert_array_equal(new["attn"]["kv_a"], params["attn"]["kv_a"])  # latent and shared k_rope untouched
  np.testing.assert_array_equal(new["embed"]["embedding"], params["embed"]["embedding"])
  q_old, q_new = head_cols(params["attn"]["q_b"], Dn + Dr), head_cols(new["attn"]["q_b"], Dn + Dr)
  kv_old, kv_new = head_cols(params["attn"]["kv_b"], Dn + Dv), head_cols(new["attn"]["kv_b"], Dn + Dv)
  np.testing.assert_array_equal(kv_new[..., Dn:], kv_old[..., Dn:])  # value columns untouched
  for old, new_ in ((q_old, q_new), (kv_old[..., :Dn], kv_new[..., :Dn])):
    np.testing.assert_array_equal((old == new_).all(axis=(-3, -1)), ~clipped)  # exactly the clipped heads change
  # Per head: nope columns scaled by √γ, rope columns by γ.
  gamma = np.where(clipped, tau / before, 1.0)[..., None, :, None]
  np.testing.assert_allclose(q_new[..., :Dn], q_old[..., :Dn] * np.sqrt(gamma), rtol=1e-6)
  np.testing.assert_allclose(q_new[..., Dn:], q_old[..., Dn:] * gamma, rtol=1e-6)
  np.testing.assert_allclose(kv_new[..., :Dn], kv_old[..., :Dn] * np.sqrt(gamma), rtol=1e-6)


def test_clip_is_an_update_on_top_of_the_optimizer_step():
  """With lr > 0: params + updates == clip(params + unclipped updates)."""
  Dh, tau = 4, 1.0
  rng = np.random.default_rng(2)
  params = {"q": rand(rng, D, H * Dh), "k": rand(rng, D, H * Dh), "b": rand(rng, D)}
  grads = jax.tree.map(lambda p: jnp.asarray(rand(rng, *p.shape)), params)
  logits = jnp.array([0.5, 4.0, 1.0, 2.0])
  spec = optim.mha_qk_clip("q", "k", num_heads=H, head_dim=Dh)
  plain = optim.muon_clip(0.1, ns_dtype=jnp.float32)
  clip = optim.muon_clip(0.1, ns_dtype=jnp.float32, qk_clip=spec, qk_clip_tau=tau)
  u_plain, _ = jax.jit(plain.update)(grads, plain.init(params), params)
  u_clip, _ = jax.jit(clip.update)(grads, clip.init(params), params, max_logits=logits)
  moved = optax.apply_updates(params, u_plain)
  factor = np.repeat(np.sqrt(np.minimum(1.0, tau / logits)), Dh)
  np.testing.assert_allclose(optax.apply_updates(params, u_clip)["q"], moved["q"] * factor, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(optax.apply_updates(params, u_clip)["k"], moved["k"] * factor, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(u_clip["b"], u_plain["b"])


def test_axis_name_pmaxes_the_logits():
  params = {"q": jnp.ones((D, H)), "k": jnp.ones((D, H))}
  spec = optim.mha_qk_clip("q", "k", num_heads=H, head_dim=1)
  tx = optim.muon_clip(0.0, qk_clip=spec, qk_clip_tau=1.0, axis_name="data")
  state = tx.init(params)
  shards = jnp.array([[4.0, 1.0, 0.5, 0.5], [1.0, 1.0, 0.5, 16.0]])  # two data shards' local max logits
  grads = jax.tree.map(jnp.zeros_like, params)
  updates = jax.jit(jax.vmap(lambda s: tx.update(grads, state, params, max_logits=s)[0], axis_name="data"))(shards)
  new_q = params["q"] + updates["q"][0]
  np.testing.assert_allclose(new_q[0], [0.5, 1.0, 1.0, 0.25])  # √(τ / global max) per head


# ---------------------------------------------------------------------------------------------- errors


@pytest.fixture
def mla_setup():
  params = {"l": {"q_b": jnp.zeros((2, 6, H * 6)), "kv_b": jnp.zeros((2, 5, H * 7))}}
  rule = optim.mla_qk_clip("l/q_b", "l/kv_b", num_heads=H, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=3)
  tx = optim.muon_clip(1e-3, qk_clip={"moe_layers": rule})
  return params, tx, tx.init(params), jax.tree.map(jnp.zeros_like, params)


def test_error_spec_without_max_logits(mla_setup):
  params, tx, state, grads = mla_setup
  with pytest.raises(ValueError, match=r"needs max_logits=.*\['moe_layers'\]"):
    jax.eval_shape(lambda: tx.update(grads, state, params))
  # qk_clip_tau=None disables clipping: max_logits optional and ignored.
  off = optim.muon_clip(1e-3, qk_clip={"x": None}, qk_clip_tau=None)
  jax.eval_shape(lambda: off.update(grads, off.init(params), params))


def test_error_max_logits_tree_mismatch(mla_setup):
  params, tx, state, grads = mla_setup
  with pytest.raises(ValueError, match=r"does not match the qk_clip spec.*missing from max_logits: \['moe_layers'\]"):
    jax.eval_shape(lambda: tx.update(grads, state, params, max_logits={"dense_layers": jnp.zeros((2, H))}))
  with pytest.raises(ValueError, match=r"max_logits 'moe_layers' has shape \(2, 3\), expected \(2, 4\)"):
    jax.eval_shape(lambda: tx.update(grads, state, params, max_logits={"moe_layers": jnp.zeros((2, 3))}))
  with pytest.raises(ValueError, match=r"max_logits 'moe_layers' has shape \(4,\), expected \(2, 4\)"):
    jax.eval_shape(lambda: tx.update(grads, state, params, max_logits={"moe_layers": jnp.zeros((H,))}))


def test_error_rule_targets(mla_setup):
  params, _, _, _ = mla_setup
  missing = optim.mha_qk_clip("l/q", "l/k", num_heads=H, head_dim=2)
  with pytest.raises(ValueError, match=r"rule 'a' targets param 'l/q', which is not in params"):
    optim.muon_clip(1e-3, qk_clip={"a": missing}).init(params)
  wrong = optim.mla_qk_clip("l/q_b", "l/kv_b", num_heads=H, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4)
  with pytest.raises(ValueError, match=r"'l/kv_b' has shape \(2, 5, 28\).*4 heads of segments \(4, 4\) = 32"):
    optim.muon_clip(1e-3, qk_clip={"a": wrong}).init(params)
