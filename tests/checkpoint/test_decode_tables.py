"""The one-pass FP8/INT4 decoders (quant.py, XLA on the host CPU) give the bits of the straightforward decode
(astype to float32, a float32 multiply by the scale, astype to the output dtype) on every code, NaN, subnormals,
negative zero, overflow, scales of any magnitude (tiny ones take the numpy path) and partial blocks."""

import ml_dtypes
import numpy as np
import pytest

from kimi_jax.checkpoint import quant

BF16 = np.dtype(ml_dtypes.bfloat16)
_BITS = {np.dtype(np.float32): np.uint32, BF16: np.uint16}


def _same_bits(out: np.ndarray, expected: np.ndarray) -> None:
  assert out.dtype == expected.dtype and out.shape == expected.shape and out.flags.c_contiguous
  bits = _BITS[out.dtype]
  np.testing.assert_array_equal(out.view(bits), np.ascontiguousarray(expected).view(bits))


def _fp8_case(rng, shape, exponents):
  q = rng.integers(0, 256, shape, dtype=np.uint8)
  q[0, :256] = np.arange(256)[: shape[1]]  # every code, NaN (0x7f, 0xff), -0 (0x80) and subnormals included
  scale_shape = quant.Fp8Scheme().scale_shape(shape)
  scale = (rng.random(scale_shape) + 0.5) * 2.0 ** rng.integers(*exponents, scale_shape)
  return q.view(quant.FP8_DTYPE), scale.astype(np.float32)


@pytest.mark.parametrize("dtype", [np.float32, BF16])
@pytest.mark.parametrize("exponents", [(-12, 0), (-100, 100), (-150, -110)], ids=["real", "wide", "tiny"])
@pytest.mark.parametrize("shape", [(300, 260), (256, 384), (1, 257)])
def test_fp8_decode_is_bit_identical(dtype, exponents, shape):
  rng = np.random.default_rng(sum(shape) + exponents[0])
  wq, scale = _fp8_case(rng, shape, exponents)
  scale.flat[0] = 3e38  # overflow to inf
  full = np.repeat(np.repeat(scale, 128, 0), 128, 1)[: shape[0], : shape[1]]
  with np.errstate(over="ignore"):
    reference = (wq.astype(np.float32) * full).astype(dtype)
  for r0, r1 in {(0, shape[0]), (0, 1), (min(5, shape[0] - 1), shape[0]), (shape[0] // 2, shape[0])}:
    for transpose in (False, True):
      with np.errstate(over="ignore"):
        out = quant.fp8_dequantize(wq[r0:r1], scale, (128, 128), r0, transpose=transpose, dtype=dtype)
      _same_bits(out, reference[r0:r1].T if transpose else reference[r0:r1])


@pytest.mark.parametrize("dtype", [np.float32, BF16])
@pytest.mark.parametrize("magnitude", [1e-3, 1e30, 1e-39], ids=["real", "huge", "subnormal"])
def test_int4_decode_is_bit_identical(dtype, magnitude):
  rng = np.random.default_rng(3)
  q = rng.integers(-8, 8, (37, 96))
  q[0, :16] = np.arange(-8, 8)  # all 16 codes
  scale = (rng.standard_normal((37, 3)) * magnitude).astype(BF16)
  scale[1, 1], scale[2, 2], scale[3, 0] = np.nan, -0.0, np.inf
  packed = quant.int4_pack(q)
  reference = (q.astype(np.int8).astype(np.float32) * np.repeat(scale.astype(np.float32), 32, 1)).astype(dtype)
  for transpose in (False, True):
    out = quant.int4_dequantize(packed, scale, 96, 32, transpose=transpose, dtype=dtype)
    _same_bits(out, reference.T if transpose else reference)
