"""moe_seq_chunk: the MoE run over the sequence in pieces (to bound dispatch buffers at long context) gives the
whole-sequence model's logits, gradients and expert statistics."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.config import tiny
from kimi_jax.model import KimiK2

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 16)), jnp.int32)
SEGMENTS = jnp.asarray([[1] * 16, [1] * 10 + [0] * 6], jnp.int32)  # padding must stay out of the expert load


def loss_and_grads(cfg):
  graphdef, params, rest = nnx.split(KimiK2(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

  def loss(params):
    logits, aux = nnx.merge(graphdef, params, rest)(TOKENS, segment_ids=SEGMENTS)
    return jnp.mean(logits**2), (logits, aux)

  (_, (logits, aux)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, aux, grads


@pytest.mark.parametrize("impl", ["blocked", "ragged"])
def test_chunked_moe_equals_the_whole_sequence(impl):
  cfg = tiny(dtype="float32", moe_impl=impl)
  logits, aux, grads = loss_and_grads(cfg)
  chunked_logits, chunked_aux, chunked_grads = loss_and_grads(cfg.replace(moe_seq_chunk=4))
  np.testing.assert_allclose(chunked_logits, logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(chunked_aux["expert_load"], aux["expert_load"])
  assert int(aux["expert_load"].sum()) == 26 * cfg.num_experts_per_tok * cfg.num_moe_layers  # 26 valid tokens
  for got, want in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_chunk_that_does_not_divide_the_sequence_is_refused():
  with pytest.raises(ValueError, match="moe_seq_chunk=5 does not divide the sequence length 16"):
    loss_and_grads(tiny(dtype="float32", moe_seq_chunk=5))
  with pytest.raises(ValueError, match="ModelConfig.moe_seq_chunk"):
    tiny(moe_seq_chunk=-1)
