"""Flash attention kernels for GPU (Pallas, Triton lowering), forward and backward.

Dimensions: B batch, H heads, S padded sequence, Dqk / Dv head dims, tq / tk block sizes,
nq = S/tq, nk = S/tk. Inputs are head-major [B, H, S, D] (api.py transposes and pads S).

Triton blocks need power-of-two sizes. Dv is zero-padded up to one; q and k are instead cut
along Dqk into power-of-two chunks (MLA's 192 = 128 + 64, each logit block the sum of one dot
per chunk), so the QK products do not pay for padding 192 up to 256.

Each program owns one block and loops over the other axis in registers (the classic
Triton flash-attention structure); causal programs stop at the diagonal.
fwd:  grid (nq, B, H): loop over key blocks   -> o, lse, row max of logits
dkv:  grid (nk, B, H): loop over query blocks -> dk, dv
dq:   grid (nq, B, H): loop over key blocks   -> dq
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp
import numpy as np

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


def _pad_dim(x, size=None):
  d = x.shape[-1]
  dp = size or max(16, pl.next_power_of_2(d))
  return x if d == dp else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dp - d)])


def _chunks(d: int) -> list[int]:
  """Power-of-two chunk sizes (>= 16) covering d, largest first: 192 -> [128, 64], 24 -> [16, 16 (8 + pad)]."""
  sizes, rest = [], d
  while rest > 0:
    size = max(16, 1 << (rest.bit_length() - 1))
    sizes.append(size)
    rest -= size
  return sizes


def _split(x) -> list[jax.Array]:
  """[..., D] -> chunks of `_chunks(D)` sizes along the last axis (the last one zero-padded)."""
  out, start = [], 0
  for size in _chunks(x.shape[-1]):
    out.append(_pad_dim(x[..., start : start + size], size))
    start += size
  return out


def _join(chunks, d):
  return jnp.concatenate(chunks, axis=-1)[..., :d]


def _logits(q_chunks, k_chunks, precision):
  """q·kᵀ [tq, tk] as the sum of one dot per head-dim chunk."""
  return sum(_dot(q, k, NT, precision) for q, k in zip(q_chunks, k_chunks))


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

  Returns o [B, H, S, Dv], lse [B, H, S] f32, max_logits [H] f32 (over real rows, not padding: segment 0).
  """
  b, h, s, dqk = q.shape
  dv = v.shape[-1]
  tq, tk = blocks or default_blocks(s)
  qs, ks, v = _split(q), _split(k), _pad_dim(v)
  dv_p = v.shape[-1]
  has_seg = seg is not None
  seg_args = [seg, seg] if has_seg else []
  seg_specs = (
    [pl.BlockSpec((None, tq), lambda qi, bi, hi: (bi, qi)), pl.BlockSpec((None, s), lambda qi, bi, hi: (bi, 0))]
    if has_seg
    else []
  )
  kernel = functools.partial(
    _fwd_kernel,
    scale=scale,
    causal=causal,
    seq_len=seq_len,
    tq=tq,
    tk=tk,
    nk=s // tk,
    has_seg=has_seg,
    num_chunks=len(qs),
    precision=_precision(q.dtype),
  )
  row = lambda qi, bi, hi: (bi, hi, qi)
  o, lse, m = pl.pallas_call(
    kernel,
    grid=(s // tq, b, h),
    in_specs=[
      *(pl.BlockSpec((None, None, tq, x.shape[-1]), lambda qi, bi, hi: (bi, hi, qi, 0)) for x in qs),
      *(pl.BlockSpec((None, None, s, x.shape[-1]), lambda qi, bi, hi: (bi, hi, 0, 0)) for x in ks),
      pl.BlockSpec((None, None, s, dv_p), lambda qi, bi, hi: (bi, hi, 0, 0)),
      *seg_specs,
    ],
    out_specs=[
      pl.BlockSpec((None, None, tq, dv_p), lambda qi, bi, hi: (bi, hi, qi, 0)),
      pl.BlockSpec((None, None, tq), row),
      pl.BlockSpec((None, None, tq), row),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((b, h, s, dv_p), q.dtype),
      jax.ShapeDtypeStruct((b, h, s), jnp.float32),
      jax.ShapeDtypeStruct((b, h, s), jnp.float32),
    ],
    compiler_params=_params(),
    interpret=interpret,
    name="flash_fwd_gpu",
  )(*qs, *ks, v, *seg_args)
  # Padding queries (segment 0) attend to each other; their logits must not reach qk-clip.
  m = m[:, :, :seq_len]
  if has_seg:
    m = jnp.where(seg[:, None, :seq_len] != 0, m, -jnp.inf)
  max_logits = jnp.max(m, axis=(0, 2))
  return o[..., :dv], lse, max_logits


def _fwd_kernel(*refs, scale, causal, seq_len, tq, tk, nk, has_seg, num_chunks, precision):
  q_refs, k_refs, (v_ref, *refs) = _split_refs(refs, num_chunks)
  (qseg_ref, kseg_ref), (o_ref, lse_ref, m_ref) = _seg_refs(refs, has_seg)
  qi = pl.program_id(0)
  qseg = qseg_ref[...] if has_seg else None
  q = [r[...] for r in q_refs]

  def body(kb, carry):
    m_prev, l_prev, acc = carry
    k0 = kb * tk
    s = _logits(q, [r[pl.ds(k0, tk), :] for r in k_refs], precision) * scale
    kseg = kseg_ref[pl.ds(k0, tk)] if has_seg else None
    s = jnp.where(_valid(qi * tq, k0, tq, tk, causal, seq_len, qseg, kseg), s, NEG)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new[:, None])
    acc = acc * alpha[:, None] + _dot(p.astype(v_ref.dtype), v_ref[pl.ds(k0, tk), :], NN, precision)
    return m_new, alpha * l_prev + jnp.sum(p, axis=1), acc

  num_kb = jnp.minimum(cdiv(qi * tq + tq, tk), nk) if causal else nk
  init = (
    jnp.full((tq,), NEG, jnp.float32),
    jnp.zeros((tq,), jnp.float32),
    jnp.zeros((tq, o_ref.shape[-1]), jnp.float32),
  )
  m, l, acc = lax.fori_loop(0, num_kb, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)
  m_ref[...] = m


def flash_bwd(q, k, v, seg, lse, di, do, *, scale, causal, seq_len, blocks=None, interpret=False):
  """q, k [B, H, S, Dqk]; v, do [B, H, S, Dv]; lse, di [B, H, S] f32 -> dq, dk, dv."""
  b, h, s, dqk = q.shape
  dv = v.shape[-1]
  tq, tk = blocks or default_blocks(s)
  qs, ks, v, do = _split(q), _split(k), _pad_dim(v), _pad_dim(do)
  chunks, dv_p, nc = _chunks(dqk), v.shape[-1], len(qs)
  has_seg = seg is not None
  common = dict(
    scale=scale,
    causal=causal,
    seq_len=seq_len,
    tq=tq,
    tk=tk,
    has_seg=has_seg,
    num_chunks=nc,
    precision=_precision(q.dtype),
  )
  blk = lambda n, d: pl.BlockSpec((None, None, n, d), lambda i, bi, hi: (bi, hi, i, 0))
  full = lambda d: pl.BlockSpec((None, None, s, d), lambda i, bi, hi: (bi, hi, 0, 0))
  full_row = pl.BlockSpec((None, None, s), lambda i, bi, hi: (bi, hi, 0))
  seg_full = pl.BlockSpec((None, s), lambda i, bi, hi: (bi, 0))

  seg_specs = [seg_full, pl.BlockSpec((None, tk), lambda i, bi, hi: (bi, i))] if has_seg else []
  *dks, dv_out = pl.pallas_call(
    functools.partial(_dkv_kernel, nq=s // tq, **common),
    grid=(s // tk, b, h),
    in_specs=[
      *(full(c) for c in chunks),
      *(blk(tk, c) for c in chunks),
      blk(tk, dv_p),
      full(dv_p),
      full_row,
      full_row,
      *seg_specs,
    ],
    out_specs=[*(blk(tk, c) for c in chunks), blk(tk, dv_p)],
    out_shape=[*(jax.ShapeDtypeStruct(x.shape, k.dtype) for x in ks), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=_params(),
    interpret=interpret,
    name="flash_dkv_gpu",
  )(*qs, *ks, v, do, lse, di, *([seg, seg] if has_seg else []))

  row = pl.BlockSpec((None, None, tq), lambda i, bi, hi: (bi, hi, i))
  seg_specs = [pl.BlockSpec((None, tq), lambda i, bi, hi: (bi, i)), seg_full] if has_seg else []
  dqs = pl.pallas_call(
    functools.partial(_dq_kernel, nk=s // tk, **common),
    grid=(s // tq, b, h),
    in_specs=[
      *(blk(tq, c) for c in chunks),
      *(full(c) for c in chunks),
      full(dv_p),
      blk(tq, dv_p),
      row,
      row,
      *seg_specs,
    ],
    out_specs=[blk(tq, c) for c in chunks],
    out_shape=[jax.ShapeDtypeStruct(x.shape, q.dtype) for x in qs],
    compiler_params=_params(),
    interpret=interpret,
    name="flash_dq_gpu",
  )(*qs, *ks, v, do, lse, di, *([seg, seg] if has_seg else []))
  return _join(dqs, dqk), _join(dks, dqk), dv_out[..., :dv]


def _probs_and_dlogits(q, k, v, do, lse, di, q0, k0, qseg, kseg, *, scale, causal, seq_len, tq, tk, precision):
  """p [tq, tk] (0 where masked) and ds = dL/dlogits (before the scale); q, k: lists of head-dim chunks."""
  s = _logits(q, k, precision) * scale
  valid = _valid(q0, k0, tq, tk, causal, seq_len, qseg, kseg)
  p = jnp.where(valid, jnp.exp(s - lse[:, None]), 0.0)
  ds = p * (_dot(do, v, NT, precision) - di[:, None])
  return p, ds


def _split_refs(refs, num_chunks):
  """(q chunk refs, k chunk refs, the remaining refs)."""
  return refs[:num_chunks], refs[num_chunks : 2 * num_chunks], refs[2 * num_chunks :]


def _dkv_kernel(*refs, scale, causal, seq_len, tq, tk, nq, has_seg, num_chunks, precision):
  q_refs, k_refs, (v_ref, do_ref, lse_ref, di_ref, *refs) = _split_refs(refs, num_chunks)
  (qseg_ref, kseg_ref), out_refs = _seg_refs(refs, has_seg)
  dk_refs, dv_ref = out_refs[:num_chunks], out_refs[num_chunks]
  kb = pl.program_id(0)
  k, v = [r[...] for r in k_refs], v_ref[...]
  kseg = kseg_ref[...] if has_seg else None

  def body(qb, carry):
    *dk, dv = carry
    q0 = qb * tq
    q = [r[pl.ds(q0, tq), :] for r in q_refs]
    do = do_ref[pl.ds(q0, tq), :]
    qseg = qseg_ref[pl.ds(q0, tq)] if has_seg else None
    p, ds = _probs_and_dlogits(
      q,
      k,
      v,
      do,
      lse_ref[pl.ds(q0, tq)],
      di_ref[pl.ds(q0, tq)],
      q0,
      kb * tk,
      qseg,
      kseg,
      scale=scale,
      causal=causal,
      seq_len=seq_len,
      tq=tq,
      tk=tk,
      precision=precision,
    )
    dv = dv + _dot(p.astype(do.dtype), do, TN, precision)
    dk = [acc + _dot(ds.astype(qc.dtype), qc, TN, precision) for acc, qc in zip(dk, q)]
    return (*dk, dv)

  first = (kb * tk) // tq if causal else 0
  init = (*(jnp.zeros(kc.shape, jnp.float32) for kc in k), jnp.zeros(v.shape, jnp.float32))
  *dk, dv = lax.fori_loop(first, nq, body, init)
  for ref, acc in zip(dk_refs, dk):
    ref[...] = (acc * scale).astype(ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, scale, causal, seq_len, tq, tk, nk, has_seg, num_chunks, precision):
  q_refs, k_refs, (v_ref, do_ref, lse_ref, di_ref, *refs) = _split_refs(refs, num_chunks)
  (qseg_ref, kseg_ref), dq_refs = _seg_refs(refs, has_seg)
  qi = pl.program_id(0)
  q, do, lse, di = [r[...] for r in q_refs], do_ref[...], lse_ref[...], di_ref[...]
  qseg = qseg_ref[...] if has_seg else None

  def body(kb, dq):
    k0 = kb * tk
    k = [r[pl.ds(k0, tk), :] for r in k_refs]
    kseg = kseg_ref[pl.ds(k0, tk)] if has_seg else None
    _, ds = _probs_and_dlogits(
      q,
      k,
      v_ref[pl.ds(k0, tk), :],
      do,
      lse,
      di,
      qi * tq,
      k0,
      qseg,
      kseg,
      scale=scale,
      causal=causal,
      seq_len=seq_len,
      tq=tq,
      tk=tk,
      precision=precision,
    )
    return tuple(acc + _dot(ds.astype(kc.dtype), kc, NN, precision) for acc, kc in zip(dq, k))

  num_kb = jnp.minimum(cdiv(qi * tq + tq, tk), nk) if causal else nk
  dq = lax.fori_loop(0, num_kb, body, tuple(jnp.zeros(qc.shape, jnp.float32) for qc in q))
  for ref, acc in zip(dq_refs, dq):
    ref[...] = (acc * scale).astype(ref.dtype)
