"""MLA decode kernel for TPU (Pallas / Mosaic).

Dimensions: B batch, H heads (the "query rows" of one MQA problem per batch entry),
C latent rank, R rope dim, T cache length, tk cache block, nt = T/tk, L = 128 lanes.

grid (B, nt): the key axis is the reduction with an online softmax; lengths are
scalar-prefetched so blocks past a sequence's length are skipped and their index map
re-points at the last valid block (no DMA), which matters because caches are allocated
for the maximum length.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import pick_tile

LANES = 128
NEG = -0.7 * float(np.finfo(np.float32).max)
NT = (((1,), (1,)), ((), ()))
NN = (((1,), (0,)), ((), ()))


def default_block(t: int) -> int:
  return pick_tile(t, (512, 256, 128), full_max=2048)


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def mla_decode(q_latent, q_rope, cache_latent, cache_rope, lengths, *, scale, block=None, interpret=False):
  """q_latent [B, H, C], q_rope [B, H, R], caches [B, T, C] / [B, T, R] (T % block == 0),
  lengths [B] int32 -> [B, H, C]."""
  b, h, c = q_latent.shape
  r = q_rope.shape[-1]
  t = cache_latent.shape[1]
  tk = block or default_block(t)
  nt = t // tk

  def cache_map(bi, ti, lens):
    last = jnp.maximum(pl.cdiv(lens[bi], tk) - 1, 0)
    return bi, jnp.minimum(ti, last), 0

  kernel = functools.partial(_kernel, scale=scale, tk=tk, nt=nt, precision=_precision(q_latent.dtype))
  return pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, nt),
      in_specs=[
        pl.BlockSpec((None, h, c), lambda bi, ti, lens: (bi, 0, 0)),
        pl.BlockSpec((None, h, r), lambda bi, ti, lens: (bi, 0, 0)),
        pl.BlockSpec((None, tk, c), cache_map),
        pl.BlockSpec((None, tk, r), cache_map),
      ],
      out_specs=pl.BlockSpec((None, h, c), lambda bi, ti, lens: (bi, 0, 0)),
      scratch_shapes=[
        pltpu.VMEM((h, LANES), jnp.float32),
        pltpu.VMEM((h, LANES), jnp.float32),
        pltpu.VMEM((h, c), jnp.float32),
      ],
    ),
    out_shape=jax.ShapeDtypeStruct((b, h, c), q_latent.dtype),
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
    interpret=interpret,
    name="mla_decode_tpu",
  )(lengths.astype(jnp.int32), q_latent, q_rope, cache_latent, cache_rope)


def _kernel(len_ref, ql_ref, qr_ref, cl_ref, cr_ref, o_ref, m_scr, l_scr, acc_scr, *, scale, tk, nt, precision):
  bi, ti = pl.program_id(0), pl.program_id(1)
  length = len_ref[bi]

  @pl.when(ti == 0)
  def _init():
    m_scr[...] = jnp.full_like(m_scr, NEG)
    l_scr[...] = jnp.zeros_like(l_scr)
    acc_scr[...] = jnp.zeros_like(acc_scr)

  @pl.when(ti * tk < length)
  def _step():
    cl = cl_ref[...]
    s = (
      lax.dot_general(ql_ref[...], cl, NT, preferred_element_type=jnp.float32, precision=precision)
      + lax.dot_general(qr_ref[...], cr_ref[...], NT, preferred_element_type=jnp.float32, precision=precision)
    ) * scale
    kpos = ti * tk + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where(kpos < length, s, NEG)
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new[:, :1])
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_scr[...] = acc_scr[...] * alpha[:, :1] + lax.dot_general(
      p.astype(cl.dtype), cl, NN, preferred_element_type=jnp.float32, precision=precision
    )
    m_scr[...] = m_new

  @pl.when(ti == nt - 1)
  def _finish():
    out = acc_scr[...] / l_scr[...][:, :1]
    o_ref[...] = jnp.where(length > 0, out, 0.0).astype(o_ref.dtype)
