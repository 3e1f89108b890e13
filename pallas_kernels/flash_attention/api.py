"""flash_attention: causal / segment-masked attention with a backend switch and custom VJP.

Dimensions: B batch, S sequence, H heads, Dqk query/key head dim (MLA: 192), Dv value
head dim (MLA: 128). Public layout is [B, S, H, D]; kernels run head-major
[B, H, S_pad, D] with S padded to the block sizes (padded keys are masked).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels._common import check_float, check_int, resolve_impl, round_up
from pallas_kernels.flash_attention import gpu, tpu
from pallas_kernels.flash_attention.reference import attention_reference

_KERNELS = {"tpu": tpu, "gpu": gpu}


def flash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  segment_ids=None,
  causal: bool = True,
  softmax_scale: float | None = None,
  impl: str = "auto",
  interpret: bool = False,
  return_max_logits: bool = False,
  block_sizes: tuple[int, int] | None = None,
):
  """Softmax attention, computed blockwise with an online softmax.

  Args:
    q, k: [B, S, H, Dqk]; v: [B, S, H, Dv] (Dv may differ from Dqk).
    segment_ids: [B, S] int32 or None; queries attend only to keys with the same id
      (packed sequences). Id 0 marks padding: attended like any segment, but left out of
      max_logits.
    causal: mask keys after the query position.
    softmax_scale: logit scale, default Dqk ** -0.5.
    impl: "auto" (tpu on TPU, xla elsewhere) | "xla" | "tpu" | "gpu"; interpret: Pallas interpret mode (CPU).
    return_max_logits: also return the per-head max of the scaled logits over
      unmasked pairs whose query is not padding (max over batch, queries and keys),
      for qk-clip.
    block_sizes: (tq, tk) kernel block sizes; None picks per-backend defaults.

  Returns:
    out [B, S, H, Dv] in q's dtype; with return_max_logits, (out, max_logits [H] f32),
    max_logits carrying no gradient.
  """
  if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"expected q, k [B, S, H, Dqk] and v [B, S, H, Dv]; got q {q.shape}, k {k.shape}, v {v.shape}")
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f"segment_ids must be [B, S] = {list(q.shape[:2])}, got {list(segment_ids.shape)}")
  check_float(q=q, k=k, v=v)
  if segment_ids is not None:
    check_int("segment_ids", segment_ids)
  scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
  # auto does not pick the GPU kernel: at K2 shapes (Dqk 192, 4k) its backward spills registers on an H100
  # (tests/pallas/test_gpu_aot.py); an explicit impl="gpu" still runs it.
  impl = resolve_impl(impl, gpu=False)
  if impl == "xla":
    return attention_reference(
      q, k, v, segment_ids=segment_ids, causal=causal, softmax_scale=scale, return_max_logits=return_max_logits
    )
  seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
  blocks = None if block_sizes is None else tuple(block_sizes)
  out, max_logits = _flash(q, k, v, seg, impl, causal, scale, interpret, blocks)
  return (out, max_logits) if return_max_logits else out


def _to_kernel_layout(x, sp):
  """[B, S, H, D] -> [B, H, S_pad, D]."""
  x = jnp.swapaxes(x, 1, 2)
  return jnp.pad(x, ((0, 0), (0, 0), (0, sp - x.shape[2]), (0, 0)))


def _from_kernel_layout(x, s):
  return jnp.swapaxes(x[:, :, :s], 1, 2)


def _setup(impl, s, blocks):
  kernels = _KERNELS[impl]
  blocks = blocks or kernels.default_blocks(s)
  return kernels, blocks, round_up(s, math.lcm(*blocks))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _flash(q, k, v, seg, impl, causal, scale, interpret, blocks):
  return _flash_fwd(q, k, v, seg, impl, causal, scale, interpret, blocks)[0]


def _flash_fwd(q, k, v, seg, impl, causal, scale, interpret, blocks):
  s = q.shape[1]
  kernels, blocks, sp = _setup(impl, s, blocks)
  qh, kh, vh = (_to_kernel_layout(x, sp) for x in (q, k, v))
  segp = None if seg is None else jnp.pad(seg, ((0, 0), (0, sp - s)), constant_values=-1)
  o, lse, max_logits = kernels.flash_fwd(
    qh, kh, vh, segp, scale=scale, causal=causal, seq_len=s, blocks=blocks, interpret=interpret
  )
  out = (_from_kernel_layout(o, s), jax.lax.stop_gradient(max_logits))
  return out, (qh, kh, vh, segp, o, lse)


def _flash_bwd(impl, causal, scale, interpret, blocks, res, cotangents):
  qh, kh, vh, segp, o, lse = res
  dout, _ = cotangents  # max_logits has no gradient
  s = dout.shape[1]
  kernels, blocks, sp = _setup(impl, s, blocks)
  do = _to_kernel_layout(dout.astype(o.dtype), sp)
  di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  dq, dk, dv = kernels.flash_bwd(
    qh, kh, vh, segp, lse, di, do, scale=scale, causal=causal, seq_len=s, blocks=blocks, interpret=interpret
  )
  return (_from_kernel_layout(dq, s), _from_kernel_layout(dk, s), _from_kernel_layout(dv, s), None)


_flash.defvjp(_flash_fwd, _flash_bwd)
