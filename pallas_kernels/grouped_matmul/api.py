"""gmm / tgmm: grouped matmul with a backend switch and a custom VJP.

Dimensions: M rows (tokens x top-k, sorted by expert), K contraction, N output
columns, G local groups (experts held by this device), GT all groups.

  out = gmm(lhs[M, K], rhs[G, K, N], group_sizes[GT])       -> [M, N]
  dlhs = gmm(dout[M, N], rhs^T[G, N, K])                      (rhs read transposed in-kernel)
  drhs = tgmm(lhs[M, K], dout[M, N])                          -> [G, K, N]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import check_float, check_int, resolve_impl
from pallas_kernels.grouped_matmul import gpu, reference, tpu

_KERNELS = {"tpu": tpu, "gpu": gpu}


def _check(lhs, rhs, group_sizes, group_offset, rhs_name="rhs"):
  if lhs.ndim != 2:
    raise ValueError(f"lhs must be [M, K], got shape {lhs.shape}")
  if group_sizes.ndim != 1 or group_sizes.dtype != jnp.int32:
    raise ValueError(f"group_sizes must be a 1-D int32 array, got {group_sizes.dtype}{list(group_sizes.shape)}")
  if group_offset is not None:
    check_int("group_offset", group_offset, ndim=0)
  if rhs is not None and rhs.shape[0] > group_sizes.shape[0]:
    raise ValueError(f"{rhs_name} has {rhs.shape[0]} groups but group_sizes only {group_sizes.shape[0]}")
  if group_offset is None and rhs is not None and rhs.shape[0] != group_sizes.shape[0]:
    raise ValueError(
      f"{rhs_name} holds {rhs.shape[0]} of {group_sizes.shape[0]} groups: pass group_offset (the first local group)"
    )


def gmm(
  lhs: jax.Array,
  rhs: jax.Array,
  group_sizes: jax.Array,
  *,
  impl: str = "auto",
  interpret: bool = False,
  preferred_element_type=None,
  group_offset=None,
  tiling: tuple[int, int, int] | None = None,
) -> jax.Array:
  """Grouped matmul: rows of lhs grouped contiguously by group_sizes.

  Args:
    lhs: [M, K]. Group g owns rows [sum(group_sizes[:g]), sum(group_sizes[:g+1])).
    rhs: [G, K, N], the weights of the local groups [offset, offset + G).
    group_sizes: [GT] int32, GT >= G. sum(group_sizes) may be < M: trailing rows
      give zero rows.
    impl: "auto" (tpu on TPU, gpu on GPU, xla elsewhere), "xla" (jax.lax.ragged_dot),
      "tpu" (Pallas Mosaic) or "gpu" (Pallas Triton).
    interpret: run the Pallas kernel in interpret mode (CPU testing).
    preferred_element_type: output dtype (default: promoted input dtype). The
      kernels always accumulate in f32.
    group_offset: scalar int32, the first local group (expert parallelism). Rows of
      other groups give zero rows. None means 0 and requires G == GT.
    tiling: (tm, tk, tn) for the forward kernel (the backward kernels reuse the
      same sizes for their M, K, N); None picks per-backend defaults.

  Returns:
    out: [M, N].
  """
  _check(lhs, rhs, group_sizes, group_offset)
  check_float(lhs=lhs, rhs=rhs)
  if rhs.ndim != 3 or rhs.shape[1] != lhs.shape[1]:
    raise ValueError(f"rhs must be [G, K={lhs.shape[1]}, N], got shape {rhs.shape}")
  impl = resolve_impl(impl)
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))
  if impl == "xla":
    return reference.gmm_reference(lhs, rhs, group_sizes, group_offset=group_offset, preferred_element_type=out_dtype)
  if lhs.shape[0] == 0:
    return jnp.zeros((0, rhs.shape[2]), out_dtype)
  offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
  return _gmm(lhs, rhs, group_sizes, offset, impl, interpret, out_dtype, None if tiling is None else tuple(tiling))


def tgmm(
  lhs: jax.Array,
  dout: jax.Array,
  group_sizes: jax.Array,
  *,
  num_groups: int | None = None,
  impl: str = "auto",
  interpret: bool = False,
  preferred_element_type=None,
  group_offset=None,
  tiling: tuple[int, int, int] | None = None,
) -> jax.Array:
  """Transposed grouped matmul: out[g] = lhs[rows of g]^T @ dout[rows of g].

  lhs: [M, K]; dout: [M, N]; group_sizes: [GT] int32; num_groups: G local groups
  (default GT; with group_offset, groups [offset, offset + G)). Returns [G, K, N]
  (zeros for empty groups). tiling is (tm, tk, tn).
  """
  _check(lhs, None, group_sizes, group_offset)
  if dout.ndim != 2 or dout.shape[0] != lhs.shape[0]:
    raise ValueError(f"dout must be [M={lhs.shape[0]}, N], got shape {dout.shape}")
  check_float(lhs=lhs, dout=dout)
  num_groups = group_sizes.shape[0] if num_groups is None else num_groups
  impl = resolve_impl(impl)
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs.dtype, dout.dtype))
  if impl == "xla":
    return reference.tgmm_reference(
      lhs, dout, group_sizes, num_groups=num_groups, group_offset=group_offset, preferred_element_type=out_dtype
    )
  offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
  return _KERNELS[impl].tgmm(
    lhs,
    dout,
    group_sizes,
    num_groups=num_groups,
    group_offset=offset,
    out_dtype=out_dtype,
    tiling=tiling,
    interpret=interpret,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _gmm(lhs, rhs, group_sizes, offset, impl, interpret, out_dtype, tiling):
  return _KERNELS[impl].gmm(
    lhs, rhs, group_sizes, group_offset=offset, out_dtype=out_dtype, tiling=tiling, interpret=interpret
  )


def _gmm_fwd(lhs, rhs, group_sizes, offset, impl, interpret, out_dtype, tiling):
  out = _gmm(lhs, rhs, group_sizes, offset, impl, interpret, out_dtype, tiling)
  return out, (lhs, rhs, group_sizes, offset)


def _gmm_bwd(impl, interpret, out_dtype, tiling, res, dout):
  lhs, rhs, group_sizes, offset = res
  kernels = _KERNELS[impl]
  # dlhs[M, K] contracts over N: forward (tm, tk, tn) becomes (tm, tn, tk).
  dlhs_tiling = None if tiling is None else (tiling[0], tiling[2], tiling[1])
  dlhs = kernels.gmm(
    dout,
    rhs,
    group_sizes,
    group_offset=offset,
    out_dtype=lhs.dtype,
    tiling=dlhs_tiling,
    transpose_rhs=True,
    interpret=interpret,
  )
  drhs = kernels.tgmm(
    lhs,
    dout,
    group_sizes,
    num_groups=rhs.shape[0],
    group_offset=offset,
    out_dtype=rhs.dtype,
    tiling=tiling,
    interpret=interpret,
  )
  return dlhs, drhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)
