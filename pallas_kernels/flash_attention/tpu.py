"""Flash attention kernels for TPU (Pallas / Mosaic), forward and backward.

Dimensions: B batch, H heads, S padded sequence, Dqk / Dv head dims, tq / tk query and
key block sizes, nq = S/tq, nk = S/tk, L = 128 lanes. Inputs are head-major
[B, H, S, D] (api.py transposes and pads).

Per-row statistics (running max m, sum l, log-sum-exp, di = rowsum(o * do)) live as
[tq, L] lane-replicated tiles, the layout Mosaic handles natively; segment ids come as
q: [B, S, L] (lane-replicated) and kv: [B, 8, S] (sublane-replicated), so the
[tq, tk] mask is a broadcast compare. Masked logits use a large finite negative, so a
row whose first key blocks are fully masked recovers via the online-softmax rescale.
Causal blocks above the diagonal are skipped, and their index maps re-point at an
already-fetched block so the pipeline issues no DMA for them.

fwd:  grid (B, H, nq, nk)  -> o, lse, per-q-block max logit
dkv:  grid (B, H, nk, nq)  -> dk, dv  (accumulate over query blocks)
dq:   grid (B, H, nq, nk)  -> dq      (accumulate over key blocks)
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import round_up

LANES, SUBLANES = 128, 8
NEG = -0.7 * float(np.finfo(np.float32).max)
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b
NN = (((1,), (0,)), ((), ()))  # a @ b


def default_blocks(seq_len: int) -> tuple[int, int]:
  """(tq, tk): 512 for long sequences; one full-length block (rounded to 16) otherwise."""
  b = 512 if seq_len > 512 else round_up(seq_len, 16)
  return b, b


def _precision(dtype):
  # Explicit, so a global jax_default_matmul_precision cannot change the kernel.
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _dot(a, b, dims, precision):
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _valid(qi, kb, *, tq, tk, causal, seq_len, qseg_ref, kseg_ref):
  """[tq, tk] bool: key is real, not in the future (causal), same segment."""
  qpos = qi * tq + lax.broadcasted_iota(jnp.int32, (tq, tk), 0)
  kpos = kb * tk + lax.broadcasted_iota(jnp.int32, (tq, tk), 1)
  valid = kpos < seq_len
  if causal:
    valid &= kpos <= qpos
  if qseg_ref is not None:
    valid &= qseg_ref[:, :1] == kseg_ref[:1, :]
  return valid


def _block_needed(qi, kb, tq, tk, causal):
  return (kb * tk <= qi * tq + tq - 1) if causal else True


def _seg_inputs(seg, tq, tk, q_map, k_map):
  """Segment-id operands and specs (none when there are no segments)."""
  if seg is None:
    return [], []
  b, s = seg.shape
  qseg = jnp.broadcast_to(seg[:, :, None], (b, s, LANES))
  kseg = jnp.broadcast_to(seg[:, None, :], (b, SUBLANES, s))
  return [qseg, kseg], [pl.BlockSpec((None, tq, LANES), q_map), pl.BlockSpec((None, SUBLANES, tk), k_map)]


def _lanes(x):
  return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def _params(*sem):
  return pltpu.CompilerParams(dimension_semantics=sem)


# ----------------------------------------------------------------------------- forward


def flash_fwd(q, k, v, seg, *, scale, causal, seq_len, blocks=None, interpret=False):
  """q, k: [B, H, S, Dqk]; v: [B, H, S, Dv]; seg: [B, S] int32 or None.

  Returns o [B, H, S, Dv], lse [B, H, S] f32, max_logits [H] f32 (over real rows, not padding: segment 0).
  """
  b, h, s, dqk = q.shape
  dv = v.shape[-1]
  tq, tk = blocks or default_blocks(s)
  nq, nk = s // tq, s // tk

  def kv_block(qi, kb):  # skipped causal blocks re-use the last needed block
    return jnp.minimum(kb, (qi * tq + tq - 1) // tk) if causal else kb

  seg_args, seg_specs = _seg_inputs(
    seg, tq, tk, lambda bi, hi, qi, kb: (bi, qi, 0), lambda bi, hi, qi, kb: (bi, 0, kv_block(qi, kb))
  )
  kernel = functools.partial(
    _fwd_kernel,
    scale=scale,
    causal=causal,
    seq_len=seq_len,
    tq=tq,
    tk=tk,
    nk=nk,
    has_seg=seg is not None,
    precision=_precision(q.dtype),
  )
  o, lse, mx = pl.pallas_call(
    kernel,
    grid=(b, h, nq, nk),
    in_specs=[
      pl.BlockSpec((None, None, tq, dqk), lambda bi, hi, qi, kb: (bi, hi, qi, 0)),
      pl.BlockSpec((None, None, tk, dqk), lambda bi, hi, qi, kb: (bi, hi, kv_block(qi, kb), 0)),
      pl.BlockSpec((None, None, tk, dv), lambda bi, hi, qi, kb: (bi, hi, kv_block(qi, kb), 0)),
      *seg_specs,
    ],
    out_specs=[
      pl.BlockSpec((None, None, tq, dv), lambda bi, hi, qi, kb: (bi, hi, qi, 0)),
      pl.BlockSpec((None, None, tq, LANES), lambda bi, hi, qi, kb: (bi, hi, qi, 0)),
      pl.BlockSpec((None, None, SUBLANES, LANES), lambda bi, hi, qi, kb: (bi, hi, qi, 0)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((b, h, s, dv), q.dtype),
      jax.ShapeDtypeStruct((b, h, s, LANES), jnp.float32),
      jax.ShapeDtypeStruct((b, h, nq * SUBLANES, LANES), jnp.float32),
    ],
    scratch_shapes=[
      pltpu.VMEM((tq, LANES), jnp.float32),
      pltpu.VMEM((tq, LANES), jnp.float32),
      pltpu.VMEM((tq, dv), jnp.float32),
    ],
    compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
    interpret=interpret,
    name="flash_fwd_tpu",
  )(q, k, v, *seg_args)
  return o, lse[..., 0], jnp.max(mx, axis=(0, 2, 3))


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, scale, causal, seq_len, tq, tk, nk, has_seg, precision):
  qseg_ref, kseg_ref = refs[:2] if has_seg else (None, None)
  o_ref, lse_ref, mx_ref, m_scr, l_scr, acc_scr = refs[2:] if has_seg else refs
  qi, kb = pl.program_id(2), pl.program_id(3)

  @pl.when(kb == 0)
  def _init():
    m_scr[...] = jnp.full_like(m_scr, NEG)
    l_scr[...] = jnp.zeros_like(l_scr)
    acc_scr[...] = jnp.zeros_like(acc_scr)

  @pl.when(_block_needed(qi, kb, tq, tk, causal))
  def _step():
    s = _dot(q_ref[...], k_ref[...], NT, precision) * scale
    s = jnp.where(
      _valid(qi, kb, tq=tq, tk=tk, causal=causal, seq_len=seq_len, qseg_ref=qseg_ref, kseg_ref=kseg_ref), s, NEG
    )
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new[:, :1])
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_scr[...] = acc_scr[...] * alpha[:, :1] + _dot(p.astype(v_ref.dtype), v_ref[...], NN, precision)
    m_scr[...] = m_new

  @pl.when(kb == nk - 1)
  def _finish():
    m, l = m_scr[...], l_scr[...]
    o_ref[...] = (acc_scr[...] / l[:, :1]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)
    # m is the row max over unmasked keys. Rows past seq_len and padding queries (segment 0) are left out: a
    # padding block attends to itself, and its logits must not reach qk-clip.
    rows = qi * tq + lax.broadcasted_iota(jnp.int32, m.shape, 0)
    counted = rows < seq_len
    if qseg_ref is not None:
      counted &= qseg_ref[...] != 0
    mx = jnp.max(jnp.where(counted, m, -jnp.inf), axis=0, keepdims=True)
    mx_ref[...] = jnp.broadcast_to(mx, mx_ref.shape)


# ---------------------------------------------------------------------------- backward


def flash_bwd(q, k, v, seg, lse, di, do, *, scale, causal, seq_len, blocks=None, interpret=False):
  """Gradients: q, k [B, H, S, Dqk]; v, do [B, H, S, Dv]; lse, di [B, H, S] f32.

  Returns dq, dk, dv (dtypes of q, k, v).
  """
  b, h, s, dqk = q.shape
  dv_dim = v.shape[-1]
  tq, tk = blocks or default_blocks(s)
  nq, nk = s // tq, s // tk
  lse, di = _lanes(lse), _lanes(di)
  prec = _precision(q.dtype)
  common = dict(scale=scale, causal=causal, seq_len=seq_len, tq=tq, tk=tk, has_seg=seg is not None, precision=prec)

  # dk, dv: grid (B, H, nk, nq); skipped causal q blocks re-use the first needed block.
  def q_block(kb, qi):
    return jnp.maximum(qi, (kb * tk) // tq) if causal else qi

  qmap = lambda bi, hi, kb, qi: (bi, hi, q_block(kb, qi), 0)
  kmap = lambda bi, hi, kb, qi: (bi, hi, kb, 0)
  seg_args, seg_specs = _seg_inputs(
    seg, tq, tk, lambda bi, hi, kb, qi: (bi, q_block(kb, qi), 0), lambda bi, hi, kb, qi: (bi, 0, kb)
  )
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, nq=nq, **common),
    grid=(b, h, nk, nq),
    in_specs=[*_bwd_in_specs(qmap, kmap, tq, tk, dqk, dv_dim), *seg_specs],
    out_specs=[pl.BlockSpec((None, None, tk, dqk), kmap), pl.BlockSpec((None, None, tk, dv_dim), kmap)],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    scratch_shapes=[pltpu.VMEM((tk, dqk), jnp.float32), pltpu.VMEM((tk, dv_dim), jnp.float32)],
    compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
    interpret=interpret,
    name="flash_dkv_tpu",
  )(q, k, v, do, lse, di, *seg_args)

  # dq: grid (B, H, nq, nk); skipped causal k blocks re-use the last needed block.
  def kv_block(qi, kb):
    return jnp.minimum(kb, (qi * tq + tq - 1) // tk) if causal else kb

  qmap = lambda bi, hi, qi, kb: (bi, hi, qi, 0)
  kmap = lambda bi, hi, qi, kb: (bi, hi, kv_block(qi, kb), 0)
  seg_args, seg_specs = _seg_inputs(
    seg, tq, tk, lambda bi, hi, qi, kb: (bi, qi, 0), lambda bi, hi, qi, kb: (bi, 0, kv_block(qi, kb))
  )
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, nk=nk, **common),
    grid=(b, h, nq, nk),
    in_specs=[*_bwd_in_specs(qmap, kmap, tq, tk, dqk, dv_dim), *seg_specs],
    out_specs=pl.BlockSpec((None, None, tq, dqk), qmap),
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    scratch_shapes=[pltpu.VMEM((tq, dqk), jnp.float32)],
    compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
    interpret=interpret,
    name="flash_dq_tpu",
  )(q, k, v, do, lse, di, *seg_args)
  return dq, dk, dv


def _bwd_in_specs(qmap, kmap, tq, tk, dqk, dv):
  """BlockSpecs of q, k, v, do, lse, di for both backward kernels (their grids differ only in the index maps)."""
  return [
    pl.BlockSpec((None, None, tq, dqk), qmap),
    pl.BlockSpec((None, None, tk, dqk), kmap),
    pl.BlockSpec((None, None, tk, dv), kmap),
    pl.BlockSpec((None, None, tq, dv), qmap),
    pl.BlockSpec((None, None, tq, LANES), qmap),
    pl.BlockSpec((None, None, tq, LANES), qmap),
  ]


def _probs_and_dlogits(
  q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kseg_ref, qi, kb, *, scale, causal, seq_len, tq, tk, precision
):
  """p = softmax probs [tq, tk] (0 where masked) and ds = dL/dlogits (before the scale)."""
  s = _dot(q_ref[...], k_ref[...], NT, precision) * scale
  valid = _valid(qi, kb, tq=tq, tk=tk, causal=causal, seq_len=seq_len, qseg_ref=qseg_ref, kseg_ref=kseg_ref)
  p = jnp.where(valid, jnp.exp(s - lse_ref[...][:, :1]), 0.0)
  dp = _dot(do_ref[...], v_ref[...], NT, precision)
  ds = p * (dp - di_ref[...][:, :1])
  return p, ds


def _dkv_kernel(
  q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, scale, causal, seq_len, tq, tk, nq, has_seg, precision
):
  qseg_ref, kseg_ref = refs[:2] if has_seg else (None, None)
  dk_ref, dv_ref, dk_scr, dv_scr = refs[2:] if has_seg else refs
  kb, qi = pl.program_id(2), pl.program_id(3)

  @pl.when(qi == 0)
  def _init():
    dk_scr[...] = jnp.zeros_like(dk_scr)
    dv_scr[...] = jnp.zeros_like(dv_scr)

  @pl.when(_block_needed(qi, kb, tq, tk, causal))
  def _step():
    p, ds = _probs_and_dlogits(
      q_ref,
      k_ref,
      v_ref,
      do_ref,
      lse_ref,
      di_ref,
      qseg_ref,
      kseg_ref,
      qi,
      kb,
      scale=scale,
      causal=causal,
      seq_len=seq_len,
      tq=tq,
      tk=tk,
      precision=precision,
    )
    dv_scr[...] += _dot(p.astype(do_ref.dtype), do_ref[...], TN, precision)
    dk_scr[...] += _dot(ds.astype(q_ref.dtype), q_ref[...], TN, precision) * scale

  @pl.when(qi == nq - 1)
  def _finish():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(
  q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, scale, causal, seq_len, tq, tk, nk, has_seg, precision
):
  qseg_ref, kseg_ref = refs[:2] if has_seg else (None, None)
  dq_ref, dq_scr = refs[2:] if has_seg else refs
  qi, kb = pl.program_id(2), pl.program_id(3)

  @pl.when(kb == 0)
  def _init():
    dq_scr[...] = jnp.zeros_like(dq_scr)

  @pl.when(_block_needed(qi, kb, tq, tk, causal))
  def _step():
    _, ds = _probs_and_dlogits(
      q_ref,
      k_ref,
      v_ref,
      do_ref,
      lse_ref,
      di_ref,
      qseg_ref,
      kseg_ref,
      qi,
      kb,
      scale=scale,
      causal=causal,
      seq_len=seq_len,
      tq=tq,
      tk=tk,
      precision=precision,
    )
    dq_scr[...] += _dot(ds.astype(k_ref.dtype), k_ref[...], NN, precision) * scale

  @pl.when(kb == nk - 1)
  def _finish():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)
