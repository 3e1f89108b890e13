"""Flash attention kernels for GPU (Pallas, Triton lowering), forward and backward.

Dimensions: B batch, H heads, S padded sequence, Dqk / Dv head dims (zero-padded here
to powers of two, as Triton requires), tq / tk block sizes, nq = S/tq, nk = S/tk.
Inputs are head-major [B, H, S, D] (api.py transposes and pads S).

Each program owns one block and loops over the other axis in registers (the classic
Triton flash-attention structure); causal programs stop at the diagonal.
fwd:  grid (nq, B, H): loop over key blocks   -> o, lse, row max of logits
dkv:  grid (nk, B, H): loop over query blocks -> dk, dv
dq:   grid (nq, B, H): loop over key blocks   -> dq
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import cdiv

NEG = -0.7 * float(np.finfo(np.float32).max)
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b
NN = (((1,), (0,)), ((), ()))  # a @ b


def default_blocks(seq_len: int) -> tuple[int, int]:
  del seq_len
  return 64, 64


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _dot(a, b, dims, precision):
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _pad_dim(x):
  d = x.shape[-1]
  dp = max(16, pl.next_power_of_2(d))
  return x if d == dp else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dp - d)])


def _valid(q0, k0, tq, tk, causal, seq_len, qseg, kseg):
  qpos = q0 + lax.broadcasted_iota(jnp.int32, (tq, tk), 0)
  kpos = k0 + lax.broadcasted_iota(jnp.int32, (tq, tk), 1)
  valid = kpos < seq_len
  if causal:
    valid &= kpos <= qpos
  if qseg is not None:
    valid &= qseg[:, None] == kseg[None, :]
  return valid


def _params(num_warps=4, num_stages=2):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _seg_refs(refs, has_seg):
  return (refs[:2], refs[2:]) if has_seg else ((None, None), refs)


def flash_fwd(q, k, v, seg, *, scale, causal, seq_len, blocks=None, interpret=False):
  """q, k: [B, H, S, Dqk]; v: [B, H, S, Dv]; seg: [B, S] int32 or None.

  Returns o [B, H, S, Dv], lse [B, H, S] f32, max_logits [H] f32 (over real rows).
  """
  b, h, s, _ = q.shape
  dv = v.shape[-1]
  tq, tk = blocks or default_blocks(s)
  q, k, v = _pad_dim(q), _pad_dim(k), _pad_dim(v)
  dqk_p, dv_p = q.shape[-1], v.shape[-1]
  has_seg = seg is not None
  seg_args = [seg, seg] if has_seg else []
  seg_specs = ([pl.BlockSpec((None, tq), lambda qi, bi, hi: (bi, qi)),
                pl.BlockSpec((None, s), lambda qi, bi, hi: (bi, 0))] if has_seg else [])
  kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, seq_len=seq_len,
                             tq=tq, tk=tk, nk=s // tk, has_seg=has_seg,
                             precision=_precision(q.dtype))
  row = lambda qi, bi, hi: (bi, hi, qi)
  o, lse, m = pl.pallas_call(
      kernel,
      grid=(s // tq, b, h),
      in_specs=[pl.BlockSpec((None, None, tq, dqk_p), lambda qi, bi, hi: (bi, hi, qi, 0)),
                pl.BlockSpec((None, None, s, dqk_p), lambda qi, bi, hi: (bi, hi, 0, 0)),
                pl.BlockSpec((None, None, s, dv_p), lambda qi, bi, hi: (bi, hi, 0, 0)),
                *seg_specs],
      out_specs=[pl.BlockSpec((None, None, tq, dv_p), lambda qi, bi, hi: (bi, hi, qi, 0)),
                 pl.BlockSpec((None, None, tq), row), pl.BlockSpec((None, None, tq), row)],
      out_shape=[jax.ShapeDtypeStruct((b, h, s, dv_p), q.dtype),
                 jax.ShapeDtypeStruct((b, h, s), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, s), jnp.float32)],
      compiler_params=_params(),
      interpret=interpret,
      name="flash_fwd_gpu",
  )(q, k, v, *seg_args)
  max_logits = jnp.max(m[:, :, :seq_len], axis=(0, 2))
  return o[..., :dv], lse, max_logits


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, scale, causal, seq_len, tq, tk, nk, has_seg,
                precision):
  (qseg_ref, kseg_ref), (o_ref, lse_ref, m_ref) = _seg_refs(refs, has_seg)
  qi = pl.program_id(0)
  q = q_ref[...]
  qseg = qseg_ref[...] if has_seg else None

  def body(kb, carry):
    m_prev, l_prev, acc = carry
    k0 = kb * tk
    s = _dot(q, k_ref[pl.ds(k0, tk), :], NT, precision) * scale
    kseg = kseg_ref[pl.ds(k0, tk)] if has_seg else None
    s = jnp.where(_valid(qi * tq, k0, tq, tk, causal, seq_len, qseg, kseg), s, NEG)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new[:, None])
    acc = acc * alpha[:, None] + _dot(p.astype(v_ref.dtype), v_ref[pl.ds(k0, tk), :], NN,
                                      precision)
    return m_new, alpha * l_prev + jnp.sum(p, axis=1), acc

  num_kb = jnp.minimum(cdiv(qi * tq + tq, tk), nk) if causal else nk
  init = (jnp.full((tq,), NEG, jnp.float32), jnp.zeros((tq,), jnp.float32),
          jnp.zeros((tq, o_ref.shape[-1]), jnp.float32))
  m, l, acc = lax.fori_loop(0, num_kb, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)
  m_ref[...] = m


def flash_bwd(q, k, v, seg, lse, di, do, *, scale, causal, seq_len, blocks=None,
              interpret=False):
  """q, k [B, H, S, Dqk]; v, do [B, H, S, Dv]; lse, di [B, H, S] f32 -> dq, dk, dv."""
  b, h, s, dqk = q.shape
  dv = v.shape[-1]
  tq, tk = blocks or default_blocks(s)
  q, k, v, do = _pad_dim(q), _pad_dim(k), _pad_dim(v), _pad_dim(do)
  dqk_p, dv_p = q.shape[-1], v.shape[-1]
  has_seg = seg is not None
  common = dict(scale=scale, causal=causal, seq_len=seq_len, tq=tq, tk=tk, has_seg=has_seg,
                precision=_precision(q.dtype))
  blk = lambda n, d: pl.BlockSpec((None, None, n, d), lambda i, bi, hi: (bi, hi, i, 0))
  full = lambda d: pl.BlockSpec((None, None, s, d), lambda i, bi, hi: (bi, hi, 0, 0))
  full_row = pl.BlockSpec((None, None, s), lambda i, bi, hi: (bi, hi, 0))
  seg_full = pl.BlockSpec((None, s), lambda i, bi, hi: (bi, 0))

  seg_specs = [seg_full, pl.BlockSpec((None, tk), lambda i, bi, hi: (bi, i))] if has_seg else []
  dk, dv_out = pl.pallas_call(
      functools.partial(_dkv_kernel, nq=s // tq, **common),
      grid=(s // tk, b, h),
      in_specs=[full(dqk_p), blk(tk, dqk_p), blk(tk, dv_p), full(dv_p), full_row, full_row,
                *seg_specs],
      out_specs=[blk(tk, dqk_p), blk(tk, dv_p)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(),
      interpret=interpret,
      name="flash_dkv_gpu",
  )(q, k, v, do, lse, di, *([seg, seg] if has_seg else []))

  row = pl.BlockSpec((None, None, tq), lambda i, bi, hi: (bi, hi, i))
  seg_specs = [pl.BlockSpec((None, tq), lambda i, bi, hi: (bi, i)), seg_full] if has_seg else []
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, nk=s // tk, **common),
      grid=(s // tq, b, h),
      in_specs=[blk(tq, dqk_p), full(dqk_p), full(dv_p), blk(tq, dv_p), row, row, *seg_specs],
      out_specs=blk(tq, dqk_p),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(),
      interpret=interpret,
      name="flash_dq_gpu",
  )(q, k, v, do, lse, di, *([seg, seg] if has_seg else []))
  return dq[..., :dqk], dk[..., :dqk], dv_out[..., :dv]


def _probs_and_dlogits(q, k, v, do, lse, di, q0, k0, qseg, kseg, *, scale, causal, seq_len,
                       tq, tk, precision):
  """p [tq, tk] (0 where masked) and ds = dL/dlogits (before the scale)."""
  s = _dot(q, k, NT, precision) * scale
  valid = _valid(q0, k0, tq, tk, causal, seq_len, qseg, kseg)
  p = jnp.where(valid, jnp.exp(s - lse[:, None]), 0.0)
  ds = p * (_dot(do, v, NT, precision) - di[:, None])
  return p, ds


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, scale, causal, seq_len,
                tq, tk, nq, has_seg, precision):
  (qseg_ref, kseg_ref), (dk_ref, dv_ref) = _seg_refs(refs, has_seg)
  kb = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  kseg = kseg_ref[...] if has_seg else None

  def body(qb, carry):
    dk, dv = carry
    q0 = qb * tq
    q = q_ref[pl.ds(q0, tq), :]
    do = do_ref[pl.ds(q0, tq), :]
    qseg = qseg_ref[pl.ds(q0, tq)] if has_seg else None
    p, ds = _probs_and_dlogits(q, k, v, do, lse_ref[pl.ds(q0, tq)], di_ref[pl.ds(q0, tq)],
                               q0, kb * tk, qseg, kseg, scale=scale, causal=causal,
                               seq_len=seq_len, tq=tq, tk=tk, precision=precision)
    dv = dv + _dot(p.astype(do.dtype), do, TN, precision)
    dk = dk + _dot(ds.astype(q.dtype), q, TN, precision)
    return dk, dv

  first = (kb * tk) // tq if causal else 0
  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = lax.fori_loop(first, nq, body, init)
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, scale, causal, seq_len,
               tq, tk, nk, has_seg, precision):
  (qseg_ref, kseg_ref), (dq_ref,) = _seg_refs(refs, has_seg)
  qi = pl.program_id(0)
  q, do, lse, di = q_ref[...], do_ref[...], lse_ref[...], di_ref[...]
  qseg = qseg_ref[...] if has_seg else None

  def body(kb, dq):
    k0 = kb * tk
    k = k_ref[pl.ds(k0, tk), :]
    kseg = kseg_ref[pl.ds(k0, tk)] if has_seg else None
    _, ds = _probs_and_dlogits(q, k, v_ref[pl.ds(k0, tk), :], do, lse, di, qi * tq, k0, qseg,
                               kseg, scale=scale, causal=causal, seq_len=seq_len, tq=tq, tk=tk,
                               precision=precision)
    return dq + _dot(ds.astype(k.dtype), k, NN, precision)

  num_kb = jnp.minimum(cdiv(qi * tq + tq, tk), nk) if causal else nk
  dq = lax.fori_loop(0, num_kb, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
