"""Our model against transformers' DeepseekV3 on the committed fixture (tests/reference/make_fixture.py)."""

from flax import nnx
from helpers.paths import TINY_HF
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.checkpoint.hf import HFCheckpoint, load_state
from kimi_jax.layers.rope import apply_rope, rope_attention_scaling, rope_cos_sin, yarn_inv_freq
from kimi_jax.model_stats import abstract_model

IMPLS = ("dense", "ragged", "blocked")


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(TINY_HF / "reference.npz"))


@pytest.fixture(scope="module")
def loaded():
  ckpt = HFCheckpoint(TINY_HF)
  cfg = ckpt.config(dtype="float32")
  return cfg, load_state(ckpt, cfg)


def build(cfg, state, **changes):
  cfg = cfg.replace(**changes)
  model = abstract_model(cfg)
  nnx.update(model, jax.tree.map(jnp.asarray, state))
  return model


def layer(model, i):
  """Decoder layer i (0-based over the whole model) as a standalone module."""
  k = model.cfg.first_k_dense_replace
  stack, j = (model.dense_layers, i) if i < k else (model.moe_layers, i - k)
  graphdef, state = nnx.split(stack)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[j], state))


@pytest.mark.parametrize("impl", IMPLS)
def test_logits_match_transformers(loaded, ref, impl):
  model = build(*loaded, moe_impl=impl)
  logits, aux = model(jnp.asarray(ref["tokens"]), return_hidden=True)
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
  hidden = np.asarray(aux["hidden"])
  np.testing.assert_allclose(hidden[:3], ref["hidden_states"][:3], atol=1e-4, rtol=0)
  np.testing.assert_allclose(hidden[3], ref["final_pre_norm"], atol=1e-4, rtol=0)


def test_yarn_frequencies_and_scales(loaded, ref):
  cfg, _ = loaded
  np.testing.assert_allclose(yarn_inv_freq(cfg), ref["yarn_inv_freq"], rtol=1e-6)
  assert rope_attention_scaling(cfg) == pytest.approx(float(ref["attention_scaling"]))
  assert cfg.softmax_scale == pytest.approx(float(ref["softmax_scale"]), rel=1e-6)
  # transformers returns cos/sin as cat(freqs, freqs): its first half is our per-pair table.
  cos, sin = rope_cos_sin(jnp.asarray(ref["rope_positions"])[None], cfg)
  half = cfg.qk_rope_head_dim // 2
  np.testing.assert_allclose(cos[0], ref["cos"][:, :half], atol=1e-6)
  np.testing.assert_allclose(sin[0], ref["sin"][:, :half], atol=1e-6)


def test_rope_matches_up_to_the_shared_reordering(loaded, ref):
  """transformers rotates interleaved pairs, then reorders to half layout; we rotate in place."""
  cfg, _ = loaded
  cos, sin = rope_cos_sin(jnp.arange(12)[None], cfg)
  to_half = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])
  for name in ("q", "k"):
    x = jnp.asarray(ref[f"rope_{name}_in"]).transpose(0, 2, 1, 3)  # [1, S, H, R]
    out = np.asarray(apply_rope(x, cos, sin)).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(out[..., to_half], ref[f"rope_{name}_out"], atol=1e-5)


def _cos_sin_segments(cfg, b, s):
  cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(s), (b, s)), cfg)
  return cos, sin, jnp.ones((b, s), jnp.int32)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_mla_layer(loaded, ref, i):
  cfg, state = loaded
  attn = layer(build(cfg, state), i).attn
  out, max_logits, _ = attn(jnp.asarray(ref[f"layer{i}_attn_in"]), *_cos_sin_segments(cfg, 2, 12))
  np.testing.assert_allclose(out, ref[f"layer{i}_attn_out"], atol=1e-5)
  np.testing.assert_allclose(max_logits, ref[f"layer{i}_max_logits"], rtol=1e-5)


@pytest.mark.parametrize("i", [1, 2])
def test_router_selection_and_weights(loaded, ref, i):
  cfg, state = loaded
  router = layer(build(cfg, state), i).mlp.router
  tokens = jnp.asarray(ref[f"layer{i}_mlp_in"]).reshape(-1, cfg.hidden_size)
  weights, idx = router(tokens)
  order = np.argsort(np.asarray(idx), axis=-1)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), order, -1), ref[f"layer{i}_topk_idx"])
  np.testing.assert_allclose(
    np.take_along_axis(np.asarray(weights), order, -1), ref[f"layer{i}_topk_weight"], rtol=1e-5
  )
  # The bias must matter in this fixture, or the test above would not see a selection-only bug.
  assert float(ref["bias_changed_fraction"]) >= 0.3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("i", [1, 2])
def test_routed_and_shared_experts(loaded, ref, i, impl):
  cfg, state = loaded
  moe = layer(build(cfg, state, moe_impl=impl), i).mlp
  tokens = jnp.asarray(ref[f"layer{i}_mlp_in"]).reshape(-1, cfg.hidden_size)
  weights, idx = moe.router(tokens)
  routed, dropped = moe.experts(tokens, weights, idx)
  np.testing.assert_allclose(routed, ref[f"layer{i}_routed_out"], atol=1e-5)
  assert int(dropped) == 0
  np.testing.assert_allclose(moe.shared(tokens), ref[f"layer{i}_shared_out"], atol=1e-5)


def test_moe_impls_agree_in_values_and_gradients(loaded, ref):
  cfg, state = loaded
  tokens = jnp.asarray(ref["tokens"])
  results = {}
  for impl in IMPLS:
    model = build(cfg, state, moe_impl=impl)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, graphdef=graphdef, rest=rest):
      logits, _ = nnx.merge(graphdef, params, rest)(tokens)
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    results[impl] = jax.value_and_grad(loss)(params)
  ref_loss, ref_grads = results["dense"]
  for impl in IMPLS[1:]:
    value, grads = results[impl]
    np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads, ref_grads)
  expert_grad = ref_grads["moe_layers"]["mlp"]["experts"]["gate"]
  assert float(jnp.abs(expert_grad).max()) > 0  # gradients actually reach the experts


def test_pallas_kernels_in_the_model_match_transformers(loaded, ref):
  """moe_impl / attention_impl "pallas" (on CPU: the TPU kernels in interpret mode) against transformers."""
  model = build(*loaded, moe_impl="pallas", attention_impl="pallas")
  logits, aux = model(jnp.asarray(ref["tokens"]))
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(aux["max_logits"]["moe_layers"][0], ref["layer1_max_logits"], rtol=1e-5)
