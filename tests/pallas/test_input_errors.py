"""Bad operands get a ValueError naming the argument, for every impl (the kernels and the XLA reference agree on
what they accept: float32 or bfloat16, one dtype per call, integer ids/sizes/lengths)."""

import jax.numpy as jnp
import pytest

import pallas_kernels as pk

IMPLS = ["xla", "tpu", "gpu"]
f32, bf16 = jnp.float32, jnp.bfloat16


def _gmm_args(lhs=f32, rhs=f32):
  return jnp.ones((8, 16), lhs), jnp.ones((2, 16, 16), rhs), jnp.asarray([4, 4], jnp.int32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
  "dtypes, culprit",
  [
    ((jnp.int8, jnp.int8), "lhs has dtype int8"),
    ((jnp.float16, jnp.float16), "lhs has dtype float16"),
    ((f32, jnp.int32), "rhs has dtype int32"),
    ((bf16, f32), "rhs is float32 but lhs is bfloat16"),
  ],
)
def test_gmm_dtypes(impl, dtypes, culprit):
  with pytest.raises(ValueError, match=culprit):
    pk.gmm(*_gmm_args(*dtypes), impl=impl, interpret=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_tgmm_and_group_offset(impl):
  lhs, _, sizes = _gmm_args()
  with pytest.raises(ValueError, match="dout is bfloat16 but lhs is float32"):
    pk.tgmm(lhs, jnp.ones((8, 16), bf16), sizes, impl=impl, interpret=True)
  with pytest.raises(ValueError, match="group_offset must be an integer"):
    pk.gmm(*_gmm_args(), group_offset=jnp.float32(0.0), impl=impl, interpret=True)
  with pytest.raises(ValueError, match="group_offset must have 0 axes"):
    pk.gmm(lhs, jnp.ones((1, 16, 16)), sizes, group_offset=jnp.zeros((1,), jnp.int32), impl=impl, interpret=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_flash_attention_dtypes(impl):
  q = jnp.ones((1, 8, 2, 16), bf16)
  with pytest.raises(ValueError, match="v is float32 but q is bfloat16"):
    pk.flash_attention(q, q, q.astype(f32), impl=impl, interpret=True)
  with pytest.raises(ValueError, match="q has dtype float16"):
    pk.flash_attention(*(q.astype(jnp.float16),) * 3, impl=impl, interpret=True)
  with pytest.raises(ValueError, match="segment_ids must be an integer"):
    pk.flash_attention(q, q, q, segment_ids=jnp.zeros((1, 8), f32), impl=impl, interpret=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_mla_decode_dtypes(impl):
  ql, qr = jnp.ones((1, 2, 32), bf16), jnp.ones((1, 2, 16), bf16)
  cl, cr = jnp.ones((1, 8, 32), bf16), jnp.ones((1, 8, 16), bf16)
  lengths = jnp.asarray([8], jnp.int32)
  with pytest.raises(ValueError, match="cache_latent is float32 but q_latent is bfloat16"):
    pk.mla_decode(ql, qr, cl.astype(f32), cr, lengths, 0.1, impl=impl, interpret=True)
  with pytest.raises(ValueError, match="lengths must be an integer"):
    pk.mla_decode(ql, qr, cl, cr, lengths.astype(f32), 0.1, impl=impl, interpret=True)
