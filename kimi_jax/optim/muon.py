"""Muon: momentum, Newton–Schulz orthogonalisation and RMS matching for the matrix leaves of a pytree.

Dimension letters
  I, J   the two matrix axes of a leaf, named by its `muon_dims` pair (a, b)
  m, n   the wide orientation of an I×J matrix: m = min(I, J), n = max(I, J)
  ...    every other axis of the leaf is a stack axis (stacked layers L, experts E): each slice is one matrix

Per Muon leaf, with gradient G, momentum μ and the momentum buffer M (kept in float32 whatever the dtype of
the params, so that bf16 params do not lose the small μ-weighted increments):
  M ← μ M + G;   U = G + μ M (Nesterov) or M;   O = NS(U);   update = rms_scale · sqrt(max(I, J)) · O
"""

from collections.abc import Callable
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kimi_jax.optim._tree import leaf_paths, match_spec, path_str
from kimi_jax.optim.ns_sharding import moved_spec, spread

# Quintic coefficients (a, b, c) of p(σ) = aσ + bσ³ + cσ⁵ from Keller Jordan's Muon, tuned for a large slope at 0
# (p ≈ 3.44σ) rather than convergence to 1. Five iterations map every σ in [0.0052, 1] into [0.6818, 1.1344]: that
# interval is p's invariant band [p(σ*), p(p(σ*))] around its local minimum σ* ≈ 1.0501.
NS_COEFFS = (3.4445, -4.7750, 2.0315)

# A leaf's routing: None (not a Muon matrix) or the pair of axes (a, b) forming the matrix.
MuonDims = tuple[int, int] | None
MuonDimsSpec = Any | Callable[[Any], Any]  # pytree of MuonDims matching params, or params -> such a pytree

# Path fragments (lowercase, matched as substrings of any path key) that keep a >= 2-D leaf off Muon by default.
ADAMW_NAME_HINTS = ("embed", "lm_head", "norm", "bias")


def _precision(dtype: Any) -> jax.lax.Precision:
  """Explicit, so a global `jax_default_matmul_precision` cannot ask Mosaic for float32 passes on bf16 inputs."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def newton_schulz_step(y: jax.Array, coeffs: tuple[float, float, float] = NS_COEFFS) -> jax.Array:
  """One quintic step y ← a·y + (b·G + c·G²)·y with G = y·yᵀ, for y [..., m, n] (m ≤ n), in y's dtype.

  Each line is one multiply-add whose products accumulate in float32 and round to y's dtype once, as torch's addmm
  does and TPU/GPU matrix units do natively; rounding every product and sum separately in bf16 measured ~4x
  further from the float32 result.
  """
  a, b, c = coeffs
  dtype = y.dtype
  mm = functools.partial(jnp.matmul, preferred_element_type=jnp.float32, precision=_precision(dtype))
  gram = mm(y, jnp.swapaxes(y, -1, -2)).astype(dtype)  # [..., m, m]
  poly = (b * gram.astype(jnp.float32) + c * mm(gram, gram)).astype(dtype)  # [..., m, m]
  return (a * y.astype(jnp.float32) + mm(poly, y)).astype(dtype)  # [..., m, n]


def _fits_kernel(m: int, n: int, dtype: Any) -> bool:
  from pallas_kernels.matrix_iteration import VMEM_LIMIT_BYTES, vmem_bytes

  return vmem_bytes(m, n, dtype) <= VMEM_LIMIT_BYTES


def newton_schulz(
  x: jax.Array,
  steps: int = 5,
  coeffs: tuple[float, float, float] = NS_COEFFS,
  dtype: Any = jnp.bfloat16,
  eps: float = 1e-7,
  impl: str = "xla",
  interpret: bool = False,
) -> jax.Array:
  """Approximately orthogonalises every matrix in x: U S Vᵀ → U p⁽ˢᵗᵉᵖˢ⁾(S/‖x‖_F) Vᵀ.

  Args:
    x: [..., I, J]; leading axes are stack axes.
    steps: Newton–Schulz iterations.
    coeffs: (a, b, c) of the quintic p(σ) = aσ + bσ³ + cσ⁵.
    dtype: dtype the iterations run in (bf16 on accelerators; float32 for reference-exact results).
    eps: added to each matrix's Frobenius norm before dividing, so a zero matrix maps to zero.
    impl: "xla" (a loop of jnp ops), "pallas" (on TPU: all steps in one Pallas kernel per matrix, which stays
      in VMEM, `pallas_kernels.matrix_iteration`; matrices too large for its VMEM budget take the xla loop) or
      "auto" (pallas when JAX's default backend is TPU, else xla: the standalone default; kimi_jax.train passes an
      explicit choice made for the platform it compiles for, which may not be this host's).
    interpret: run the Pallas kernel in interpret mode (CPU testing).

  Returns:
    [..., I, J] in x.dtype; singular values in about [0.68, 1.13] (see NS_COEFFS).
  """
  if impl not in ("xla", "pallas", "auto"):
    raise ValueError(f"newton_schulz impl must be 'xla', 'pallas' or 'auto', got {impl!r}")
  tall = x.shape[-2] > x.shape[-1]
  x32 = x.astype(jnp.float32)
  if tall:  # iterate on [..., m, n] so the Gram matrices are the small m×m ones
    x32 = jnp.swapaxes(x32, -1, -2)
  # The norm is taken in float32 before the cast: it bounds every singular value by 1, which the iteration needs.
  norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=(-2, -1), keepdims=True))
  y = (x32 / (norm + eps)).astype(dtype)  # [..., m, n]
  m, n = y.shape[-2:]
  if impl == "auto":  # kimi_jax.optim needs only jax and optax, so not kimi_jax.backend: this host's backend decides
    impl = "pallas" if jax.default_backend() == "tpu" else "xla"
  step = functools.partial(newton_schulz_step, coeffs=coeffs)
  if impl == "pallas" and _fits_kernel(m, n, dtype):
    from pallas_kernels.matrix_iteration import matrix_iteration

    flat = y.reshape(-1, m, n)
    y = matrix_iteration(
      flat, step, steps, flops_per_step=4 * m * m * n + 2 * m**3, impl="tpu", interpret=interpret
    ).reshape(y.shape)
  else:
    for _ in range(steps):  # unrolled: XLA's cost analysis counts a while loop's body once
      y = step(y)
  if tall:
    y = jnp.swapaxes(y, -1, -2)
  return y.astype(x.dtype)


def default_muon_dims(params: Any) -> Any:
  """The default routing: (-2, -1) for leaves with ndim >= 2, None (AdamW) for the rest.

  A leaf with ndim >= 2 still gets None when any key on its path contains (case-insensitively) one of
  ADAMW_NAME_HINTS: "embed" (embeddings, unembeddings), "lm_head", "norm" (norm scales, also when stacked to
  [L, D]), "bias". Everything else with ndim >= 2 is a Muon matrix on its last two axes, all leading axes being
  stack axes. To override, pass `muon_dims` explicitly: a pytree like params with None or (a, b) per leaf, or a
  function params -> such a pytree (e.g. this one post-edited, or `kimi_jax.optim.kimi_muon_dims`).
  """

  def route(path, leaf) -> MuonDims:
    name = path_str(path).lower()
    if jnp.ndim(leaf) < 2 or any(hint in name for hint in ADAMW_NAME_HINTS):
      return None
    return (-2, -1)

  return jax.tree_util.tree_map_with_path(route, params)


def _is_dims_entry(x: Any) -> bool:
  return x is None or (isinstance(x, (tuple, list)) and all(isinstance(i, int) for i in x))


def resolve_muon_dims(params: Any, muon_dims: MuonDimsSpec | None) -> list[MuonDims]:
  """Validated, non-negative muon dims, one per leaf of params (`jax.tree.leaves` order).

  `muon_dims` is None (use `default_muon_dims`), a pytree matching params with None / (a, b) per leaf, or a
  function params -> such a pytree. Raises ValueError naming the leaf for a bad pair or an axis it lacks.
  """
  if muon_dims is None:
    muon_dims = default_muon_dims
  spec = muon_dims(params) if callable(muon_dims) else muon_dims
  entries = match_spec(params, spec, "muon_dims", _is_dims_entry)
  resolved = []
  for path, leaf, dims in zip(leaf_paths(params), jax.tree.leaves(params), entries):
    if dims is None:
      resolved.append(None)
      continue
    ndim = jnp.ndim(leaf)
    if not _is_dims_entry(dims) or len(dims) != 2:
      raise ValueError(f"muon_dims for '{path}' must be None or a pair of axes (a, b), got {dims!r}.")
    if not all(-ndim <= d < ndim for d in dims):
      raise ValueError(
        f"muon_dims for '{path}' names axes {tuple(dims)}, but the leaf has shape {jnp.shape(leaf)} ({ndim} axes)."
      )
    a, b = (d % ndim for d in dims)
    if a == b:
      raise ValueError(f"muon_dims for '{path}' names the same axis twice: {tuple(dims)}.")
    resolved.append((a, b))
  return resolved


def resolve_param_shardings(params: Any, param_shardings: Any) -> list[jax.sharding.NamedSharding | None]:
  """One NamedSharding or None per leaf of params, from a matching pytree or a function params -> pytree."""
  if param_shardings is None:
    return [None] * len(jax.tree.leaves(params))
  spec = param_shardings(params) if callable(param_shardings) else param_shardings
  is_leaf = lambda x: x is None or isinstance(x, jax.sharding.Sharding)
  entries = match_spec(params, spec, "param_shardings", is_leaf)
  for path, entry in zip(leaf_paths(params), entries):
    if entry is not None and not isinstance(entry, jax.sharding.NamedSharding):
      raise ValueError(f"param_shardings for '{path}' must be a jax.sharding.NamedSharding or None, got {entry!r}.")
  return entries


class MuonState(NamedTuple):
  """momentum: like params; float32 buffers for Muon leaves, optax.MaskedNode() for the others."""

  momentum: Any


def scale_by_muon(
  momentum: float = 0.95,
  nesterov: bool = True,
  ns_steps: int = 5,
  ns_coeffs: tuple[float, float, float] = NS_COEFFS,
  ns_dtype: Any = jnp.bfloat16,
  ns_eps: float = 1e-7,
  rms_scale: float = 0.2,
  muon_dims: MuonDimsSpec | None = None,
  param_shardings: Any = None,
  ns_impl: str = "auto",
  ns_interpret: bool = False,
) -> optax.GradientTransformation:
  """Turns the gradients of Muon leaves into RMS-matched orthogonalised momentum; other leaves pass through.

  The output is the *direction* (no learning rate, no weight decay, no sign flip): chain it with
  `optax.add_decayed_weights` and `optax.scale_by_learning_rate`, as `muon_clip` does.

  Args:
    momentum: μ in M ← μ M + G.
    nesterov: feed G + μ M (True) or M (False) to Newton–Schulz.
    ns_steps, ns_coeffs, ns_dtype, ns_eps, ns_impl, ns_interpret: see `newton_schulz` (steps, coeffs, dtype, eps,
      impl, interpret).
    rms_scale: the update is O · rms_scale · sqrt(max(I, J)), giving it an RMS of about rms_scale, like AdamW's.
    muon_dims: routing per leaf (see `resolve_muon_dims`); leaves with None are returned unchanged. A function
      is called on params at init and on the updates at update, so it must depend only on paths and shapes.
    param_shardings: None, or the params' layout as a pytree like params of `jax.sharding.NamedSharding` (or a
      function params -> such a pytree). Given it (and called under jit), Newton–Schulz runs on whole matrices
      with the batch of matrices spread over the mesh, under shard_map (see `ns_sharding.py`); None leaves the
      layout to XLA, which cannot partition the Pallas kernel: on a mesh, ns_impl="pallas" needs this.
  """

  def init_fn(params):
    dims = resolve_muon_dims(params, muon_dims)
    leaves, treedef = jax.tree.flatten(params)
    buffers = [optax.MaskedNode() if d is None else jnp.zeros_like(p, jnp.float32) for p, d in zip(leaves, dims)]
    return MuonState(momentum=jax.tree.unflatten(treedef, buffers))

  def update_fn(updates, state, params=None):
    del params
    dims = resolve_muon_dims(updates, muon_dims)
    layouts = resolve_param_shardings(updates, param_shardings)
    grads, treedef = jax.tree.flatten(updates)
    buffers = treedef.flatten_up_to(state.momentum)
    ns = lambda x, impl=ns_impl: newton_schulz(x, ns_steps, ns_coeffs, ns_dtype, ns_eps, impl, ns_interpret)
    ns_xla = functools.partial(ns, impl="xla")  # for matrices still split across devices: XLA partitions it
    new_updates, new_buffers = [], []
    for g, buf, d, layout in zip(grads, buffers, dims, layouts):
      if d is None:
        new_updates.append(g)
        new_buffers.append(buf)
        continue
      buf = momentum * buf + g.astype(jnp.float32)
      u = g.astype(jnp.float32) + momentum * buf if nesterov else buf
      u = jnp.moveaxis(u, d, (-2, -1))  # [..., I, J]
      if layout is None:
        o = ns(u)
      else:
        sharding = jax.sharding.NamedSharding(layout.mesh, moved_spec(layout.spec, u.ndim, d))
        o = spread(u, sharding, ns, ns_xla, result_dtype=ns_dtype)  # NS rounds to ns_dtype: moving back is exact
      scale = rms_scale * max(u.shape[-2:]) ** 0.5
      new_updates.append((jnp.moveaxis(o, (-2, -1), d) * scale).astype(g.dtype))
      new_buffers.append(buf)
    return jax.tree.unflatten(treedef, new_updates), MuonState(jax.tree.unflatten(treedef, new_buffers))

  return optax.GradientTransformation(init_fn, update_fn)


__all__ = (
  "NS_COEFFS",
  "ADAMW_NAME_HINTS",
  "MuonDims",
  "MuonState",
  "newton_schulz",
  "newton_schulz_step",
  "default_muon_dims",
  "resolve_muon_dims",
  "scale_by_muon",
)
