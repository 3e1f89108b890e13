"""MLA decode kernel for GPU (Pallas, Triton lowering).

Dimensions: B batch, H heads, hb heads per program, C latent rank, R rope dim, T cache
length, tk cache block. C, R and H are zero-padded to powers of two (Triton shapes).

grid (B, H/hb): each program keeps an [hb, C] f32 accumulator in registers (hb = 16
keeps it at 64 registers per thread for C = 512) and loops over the cache blocks of
its sequence only (up to lengths[b]); the heads share K/V, so the other head blocks
of the same sequence hit L2.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import cdiv, round_up

NEG = -0.7 * float(np.finfo(np.float32).max)
NT = (((1,), (1,)), ((), ()))
NN = (((1,), (0,)), ((), ()))


def default_block(t: int) -> int:
  del t
  return 64


def _pow2(n):
  return max(16, pl.next_power_of_2(n))


def _pad(x, axis, size):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def mla_decode(q_latent, q_rope, cache_latent, cache_rope, lengths, *, scale, block=None, interpret=False):
  """q_latent [B, H, C], q_rope [B, H, R], caches [B, T, C] / [B, T, R], lengths [B]
  -> [B, H, C]."""
  b, h, c = q_latent.shape
  t = cache_latent.shape[1]
  tk = block or default_block(t)
  hp, cp, rp = _pow2(h), _pow2(c), _pow2(q_rope.shape[-1])
  hb = min(16, hp)
  tp = round_up(t, tk)
  ql = _pad(_pad(q_latent, 1, hp), 2, cp)
  qr = _pad(_pad(q_rope, 1, hp), 2, rp)
  cl = _pad(_pad(cache_latent, 1, tp), 2, cp)
  cr = _pad(_pad(cache_rope, 1, tp), 2, rp)
  prec = lax.Precision.HIGHEST if jnp.dtype(ql.dtype) == jnp.float32 else lax.Precision.DEFAULT
  kernel = functools.partial(_kernel, scale=scale, tk=tk, precision=prec)
  out = pl.pallas_call(
    kernel,
    grid=(b, hp // hb),
    in_specs=[
      pl.no_block_spec,
      pl.BlockSpec((None, hb, cp), lambda bi, hi: (bi, hi, 0)),
      pl.BlockSpec((None, hb, rp), lambda bi, hi: (bi, hi, 0)),
      pl.BlockSpec((None, tp, cp), lambda bi, hi: (bi, 0, 0)),
      pl.BlockSpec((None, tp, rp), lambda bi, hi: (bi, 0, 0)),
    ],
    out_specs=pl.BlockSpec((None, hb, cp), lambda bi, hi: (bi, hi, 0)),
    out_shape=jax.ShapeDtypeStruct((b, hp, cp), q_latent.dtype),
    compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
    interpret=interpret,
    name="mla_decode_gpu",
  )(lengths.astype(jnp.int32), ql, qr, cl, cr)
  return out[:, :h, :c]


def _kernel(len_ref, ql_ref, qr_ref, cl_ref, cr_ref, o_ref, *, scale, tk, precision):
  length = len_ref[pl.program_id(0)]
  ql, qr = ql_ref[...], qr_ref[...]

  def body(ti, carry):
    m_prev, l_prev, acc = carry
    k0 = ti * tk
    cl = cl_ref[pl.ds(k0, tk), :]
    s = (
      lax.dot_general(ql, cl, NT, preferred_element_type=jnp.float32, precision=precision)
      + lax.dot_general(qr, cr_ref[pl.ds(k0, tk), :], NT, preferred_element_type=jnp.float32, precision=precision)
    ) * scale
    kpos = k0 + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where(kpos < length, s, NEG)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new[:, None])
    acc = acc * alpha[:, None] + lax.dot_general(
      p.astype(cl.dtype), cl, NN, preferred_element_type=jnp.float32, precision=precision
    )
    return m_new, alpha * l_prev + jnp.sum(p, axis=1), acc

  hb, cp = o_ref.shape
  init = (jnp.full((hb,), NEG, jnp.float32), jnp.zeros((hb,), jnp.float32), jnp.zeros((hb, cp), jnp.float32))
  _, l, acc = lax.fori_loop(0, cdiv(length, tk), body, init)
  # length == 0: no keys; l stays 0, so guard the division and write zeros.
  out = jnp.where(length > 0, acc / jnp.maximum(l, 1e-30)[:, None], 0.0)
  o_ref[...] = out.astype(o_ref.dtype)
