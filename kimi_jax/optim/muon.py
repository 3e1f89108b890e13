"""Muon: momentum, Newton–Schulz orthogonalisation and RMS matching for the matrix leaves of a pytree.

Dimension letters
  I, J   the two matrix axes of a leaf, named by its `muon_dims` pair (a, b)
  m, n   the wide orientation of an I×J matrix: m = min(I, J), n = max(I, J)
  ...    every other axis of the leaf is a stack axis (stacked layers L, experts E): each slice is one matrix

Per Muon leaf, with gradient G, momentum μ and the momentum buffer M (kept in float32 whatever the dtype of
the params, so that bf16 params do not lose the small μ-weighted increments):
  M ← μ M + G;   U = G + μ M (Nesterov) or M;   O = NS(U);   update = rms_scale · sqrt(max(I, J)) · O
"""

from collections.abc import Callable, Sequence
import functools
import itertools
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

# Polar Express (Amsel, Persson, Musco, Gower 2025, "The Polar Express: Optimal Matrix Sign Methods and Their
# Application to the Muon Algorithm", arXiv:2505.16932, Algorithm 1; github.com/NoahAmsel/PolarExpress): per step
# the minimax-optimal odd quintic for the interval the previous steps leave (l0 = 1e-3, cushion 0.024), as printed
# in Algorithm 1, then divided by the paper's safety factor (a/1.01, b/1.01³, c/1.01⁵) on every polynomial but the
# last, which (1.875, -1.25, 0.375) repeats for steps past the table. Algorithm 1 also divides the input by
# 1.01·‖X‖_F (POLAR_EXPRESS_NORM_SCALE) so that bf16 rounding cannot push a singular value past 1.
_POLAR_EXPRESS_TABLE = (
  (8.28721201814563, -23.595886519098837, 17.300387312530933),
  (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
  (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
  (3.3184196573706015, -2.488488024314874, 0.51004894012372),
  (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
  (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
  (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
  (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_COEFFS = tuple((a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS_TABLE[:-1]) + (
  _POLAR_EXPRESS_TABLE[-1],
)
POLAR_EXPRESS_NORM_SCALE = 1.01

# Named schedules for `coeffs`: name -> (per-step coefficients, the last repeating; scale of the Frobenius norm).
NS_SCHEDULES = {
  "quintic": ((NS_COEFFS,), 1.0),
  "polar_express": (POLAR_EXPRESS_COEFFS, POLAR_EXPRESS_NORM_SCALE),
}
DEFAULT_NS_STEPS = 5
# Restart points of the Gram form (before these 0-based steps X ← Q·X and R ← X·Xᵀ are recomputed from the m×n
# matrix; "Gram Newton-Schulz", Zhang, Amsel, Chen, Dao 2026, dao-ailab.github.io/blog/2026/gram-newton-schulz).
# Dao AI Lab restart once, before step 2, in float16; in bfloat16 (3 fewer mantissa bits) that measured 0.14 RMS
# away from the exact polynomial on a 512×256 matrix with singular values log-uniform in [1e-3, 1] (plain
# Newton–Schulz: 0.04), no restart 0.63; restarting before steps 2 and 4 measured 0.04, as plain.
GRAM_RESTARTS = (2, 4)

Coeffs = tuple[float, float, float]
NSCoeffsSpec = str | Coeffs | Sequence[Coeffs]


def ns_schedule(coeffs: NSCoeffsSpec = "quintic", steps: int | None = None) -> tuple[tuple[Coeffs, ...], float]:
  """(one (a, b, c) per step, norm scale) for `coeffs`: a name in NS_SCHEDULES, one triple or one per step.

  steps None: 5 for a name or a single triple, the length of a per-step sequence. A name takes its first `steps`
  entries, repeating its last; a per-step sequence must have exactly `steps` entries (optax.contrib.muon's
  `ns_coeffs` of shape (n, 3)); a triple is repeated `steps` times.
  """
  if isinstance(coeffs, str):
    if coeffs not in NS_SCHEDULES:
      raise ValueError(f"unknown Newton–Schulz schedule {coeffs!r}; known: {sorted(NS_SCHEDULES)}")
    table, norm_scale = NS_SCHEDULES[coeffs]
    steps = DEFAULT_NS_STEPS if steps is None else steps
    return tuple(table[min(i, len(table) - 1)] for i in range(steps)), norm_scale
  entries = tuple(coeffs)
  if len(entries) == 3 and all(isinstance(v, (int, float)) for v in entries):
    steps = DEFAULT_NS_STEPS if steps is None else steps
    return (tuple(float(v) for v in entries),) * steps, 1.0
  table = tuple(tuple(float(v) for v in c) for c in entries)
  if not table or any(len(c) != 3 for c in table):
    raise ValueError(f"Newton–Schulz coeffs must be a name, (a, b, c) or a sequence of (a, b, c), got {coeffs!r}")
  if steps is not None and steps != len(table):
    raise ValueError(f"{len(table)} per-step Newton–Schulz coefficients given for {steps} steps")
  return table, 1.0


# A leaf's routing: None (not a Muon matrix) or the pair of axes (a, b) forming the matrix.
MuonDims = tuple[int, int] | None
MuonDimsSpec = Any | Callable[[Any], Any]  # pytree of MuonDims matching params, or params -> such a pytree

# Path fragments (lowercase, matched as substrings of any path key) that keep a >= 2-D leaf off Muon by default.
ADAMW_NAME_HINTS = ("embed", "lm_head", "norm", "bias")


def _precision(dtype: Any) -> jax.lax.Precision:
  """Explicit, so a global `jax_default_matmul_precision` cannot ask Mosaic for float32 passes on bf16 inputs."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def _mm(dtype: Any):
  return functools.partial(jnp.matmul, preferred_element_type=jnp.float32, precision=_precision(dtype))


def _gram(t: jax.Array, out_dtype: Any = jnp.float32) -> jax.Array:
  """t·tᵀ for t [..., m, n] as one dot_general contracting both operands' last axes, accumulated in float32 and
  rounded once to out_dtype.

  Not jnp.matmul(t, swapaxes(t)): XLA:CPU turns that transpose-then-dot into a float32 copy of t and a float32
  dot, where this form runs the bf16 dot natively (measured ~2x faster on the Gram matrices of bf16 Newton–Schulz).
  """
  batch = tuple(range(t.ndim - 2))
  dims = (((t.ndim - 1,), (t.ndim - 1,)), (batch, batch))
  return jax.lax.dot_general(t, t, dims, precision=_precision(t.dtype), preferred_element_type=out_dtype)


def _dot(a: jax.Array, b: jax.Array, out_dtype: Any) -> jax.Array:
  """a·b for a [..., m, k], b [..., k, n], accumulated in float32 and rounded once to out_dtype by the dot itself
  (on CPU a float32 result cast afterwards costs one more pass over the m×n matrix)."""
  batch = tuple(range(a.ndim - 2))
  dims = (((a.ndim - 1,), (b.ndim - 2,)), (batch, batch))
  return jax.lax.dot_general(a, b, dims, precision=_precision(a.dtype), preferred_element_type=out_dtype)


def newton_schulz_step(y: jax.Array, coeffs: Coeffs = NS_COEFFS) -> jax.Array:
  """One quintic step y ← a·y + (b·G + c·G²)·y with G = y·yᵀ, for y [..., m, n] (m ≤ n), in y's dtype.

  Each line is one multiply-add whose products accumulate in float32 and round to y's dtype once, as torch's addmm
  does and TPU/GPU matrix units do natively; rounding every product and sum separately in bf16 measured ~4x
  further from the float32 result. (The Pallas kernel's step; the XLA loop runs `_newton_schulz_step_xla`.)
  """
  a, b, c = coeffs
  dtype = y.dtype
  mm = _mm(dtype)
  gram = _gram(y).astype(dtype)  # [..., m, m]
  poly = (b * gram.astype(jnp.float32) + c * mm(gram, gram)).astype(dtype)  # [..., m, m]
  return (a * y.astype(jnp.float32) + mm(poly, y)).astype(dtype)  # [..., m, n]


def _newton_schulz_step_xla(y: jax.Array, coeffs: Coeffs = NS_COEFFS) -> jax.Array:
  """`newton_schulz_step` with the same roundings, G rounded by its dot rather than by a cast after it (on CPU a
  float32 result cast afterwards is one more pass). a·y stays out of the bf16 factor: folded in, (aI + P) would
  round a itself (3.4445 → 3.4375 in bf16), biasing the polynomial at every step (measured 2x further from torch).
  """
  a, b, c = coeffs
  dtype = y.dtype
  gram = _gram(y, dtype)  # [..., m, m]
  poly = (b * gram.astype(jnp.float32) + c * _dot(gram, gram, jnp.float32)).astype(dtype)  # [..., m, m]
  return (a * y.astype(jnp.float32) + _dot(poly, y, jnp.float32)).astype(dtype)  # [..., m, n]


def gram_newton_schulz(y: jax.Array, schedule: Sequence[Coeffs], restarts: Sequence[int] = GRAM_RESTARTS):
  """The steps of `schedule` on y [..., m, n] (m ≤ n) through its m×m Gram matrix, in y's dtype.

  A plain step is y ← (aI + Z)·y with Z = bR + cR², R = y·yᵀ. Since every factor is a polynomial in R (they
  commute), the steps accumulate into one m×m matrix Q = Π(aI + Z) while R follows R ← (aI + Z)·R·(aI + Z); the
  m×n matrix is read for R at the start and multiplied once by Q at the end: 4m²n + ~8m³ FLOPs per segment against
  (4m²n + 2m³) per plain step. Q grows like R^(-1/2) on small singular values, which low precision loses, so
  before each step in `restarts` (0-based) y ← Q·y and R is recomputed (Dao AI Lab, "Gram Newton-Schulz", 2026).
  """
  dtype = y.dtype
  mm = _mm(dtype)
  f32 = lambda t: t.astype(jnp.float32)
  gram = lambda t: _gram(t, dtype)
  eye = jnp.eye(y.shape[-2], dtype=jnp.float32)
  r, q = gram(y), None  # [..., m, m]
  last = len(schedule) - 1
  for i, (a, b, c) in enumerate(schedule):
    if i in restarts and q is not None:
      y = _dot(q, y, dtype)
      r, q = gram(y), None
    z = (b * f32(r) + c * mm(r, r)).astype(dtype)  # [..., m, m]
    q = (a * eye + f32(z)).astype(dtype) if q is None else (a * f32(q) + mm(q, z)).astype(dtype)
    if i < last and i + 1 not in restarts:
      rz = (a * f32(r) + mm(r, z)).astype(dtype)  # R·(aI + Z)
      r = (a * f32(rz) + mm(z, rz)).astype(dtype)  # (aI + Z)·R·(aI + Z)
  return _dot(q, y, dtype)


def _transposed_copy(y: jax.Array) -> jax.Array:
  """swapaxes(y, -1, -2), materialised row-major (one pass, fused with whatever produced y).

  A plain swapaxes is a layout change XLA folds into the dots that read it: on CPU, a bf16 dot whose operand is
  not row-major, or that contracts an operand's leading matrix axis (YᵀY), is converted to float32 (~2x slower
  here). Flattening the matrix axes behind an optimization barrier forces the transposed copy.
  """
  t = jnp.swapaxes(y, -1, -2)
  return jax.lax.optimization_barrier(t.reshape(*t.shape[:-2], -1)).reshape(t.shape)


def _gram_pays(m: int, n: int, steps: int, restarts: Sequence[int]) -> bool:
  """Whether the Gram form needs fewer matmul FLOPs than the plain one for an m×n matrix (m ≤ n)."""
  plain = steps * (4 * m * m * n + 2 * m**3)
  gram = 4 * m * m * n  # R = y·yᵀ at the start, Q·y at the end
  for i in range(steps):
    gram += 2 * m**3  # Z = bR + cR²
    gram += 2 * m**3 if i > 0 and i not in restarts else 0  # Q ← aQ + Q·Z
    gram += 4 * m**3 if i < steps - 1 and i + 1 not in restarts else 0  # R ← (aI + Z)·R·(aI + Z)
    gram += 4 * m * m * n if i > 0 and i in restarts else 0  # restart: y ← Q·y, R ← y·yᵀ
  return gram < plain


def _fits_kernel(m: int, n: int, dtype: Any) -> bool:
  """Whether the matrix_iteration kernel holds an m×n matrix in the VMEM of the chip compiled for (16 MiB on v4)."""
  from pallas_kernels.matrix_iteration import fits

  return fits(m, n, dtype)


def newton_schulz(
  x: jax.Array,
  steps: int | None = None,
  coeffs: NSCoeffsSpec = NS_COEFFS,
  dtype: Any = jnp.bfloat16,
  eps: float = 1e-7,
  impl: str = "xla",
  interpret: bool = False,
  gram: bool | str = False,
  gram_restarts: Sequence[int] = GRAM_RESTARTS,
) -> jax.Array:
  """Approximately orthogonalises every matrix in x: U S Vᵀ → U p_s(…p_1(S/(k‖x‖_F))) Vᵀ.

  Args:
    x: [..., I, J]; leading axes are stack axes.
    steps: Newton–Schulz iterations; None: 5, or the length of a per-step `coeffs` (see `ns_schedule`).
    coeffs: the schedule: (a, b, c) of the quintic p(σ) = aσ + bσ³ + cσ⁵ for every step (default: K2's / Muon's
      NS_COEFFS), one such triple per step (like optax.contrib.muon's ns_coeffs of shape (n, 3)), or a name in
      NS_SCHEDULES ("quintic", "polar_express"); a name also sets the norm scale k (1.01 for Polar Express, else 1).
    dtype: dtype the iterations run in (bf16 on accelerators; float32 for reference-exact results).
    eps: added to each matrix's (scaled) Frobenius norm before dividing, so a zero matrix maps to zero.
    impl: "xla" (a loop of jnp ops), "pallas" (on TPU: all steps in one Pallas kernel per matrix, which stays
      in VMEM, `pallas_kernels.matrix_iteration`; one kernel per run of equal coefficients; matrices too large for
      its VMEM budget, and the Gram form, take the xla loop) or "auto" (pallas when JAX's default backend is TPU,
      else xla: the standalone default; kimi_jax.train passes an explicit choice made for the platform it compiles
      for, which may not be this host's).
    interpret: run the Pallas kernel in interpret mode (CPU testing).
    gram: iterate on the m×m Gram matrix (`gram_newton_schulz`: the same polynomial, rounded differently) for the
      matrices where that takes fewer FLOPs (rectangular enough; never square ones): True, False (the default), or
      "auto": where the XLA loop runs, not where the Pallas kernel does (kept plain, unmeasured in Gram form).
    gram_restarts: steps before which the Gram form goes back to the m×n matrix (see `gram_newton_schulz`).

  Returns:
    [..., I, J] in x.dtype; with NS_COEFFS, singular values in about [0.68, 1.13].
  """
  if impl not in ("xla", "pallas", "auto"):
    raise ValueError(f"newton_schulz impl must be 'xla', 'pallas' or 'auto', got {impl!r}")
  schedule, norm_scale = ns_schedule(coeffs, steps)
  tall = x.shape[-2] > x.shape[-1]
  x32 = x.astype(jnp.float32)
  # The norm is taken in float32 before the cast: it bounds every singular value by 1, which the iteration needs.
  norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=(-2, -1), keepdims=True))
  y = (x32 / (norm * norm_scale + eps)).astype(dtype)  # [..., I, J]
  if tall:  # iterate on [..., m, n] so the Gram matrices are the small m×m ones
    y = _transposed_copy(y)
  m, n = y.shape[-2:]
  if impl == "auto":  # kimi_jax.optim needs only jax and optax, so not kimi_jax.backend: this host's backend decides
    impl = "pallas" if jax.default_backend() == "tpu" else "xla"
  if gram not in (True, False, "auto"):
    raise ValueError(f"newton_schulz gram must be True, False or 'auto', got {gram!r}")
  use_kernel = impl == "pallas" and _fits_kernel(m, n, dtype)
  if (gram is True or (gram == "auto" and not use_kernel)) and _gram_pays(m, n, len(schedule), gram_restarts):
    y = gram_newton_schulz(y, schedule, gram_restarts)
  elif use_kernel:
    from pallas_kernels.matrix_iteration import matrix_iteration

    flat = y.reshape(-1, m, n)
    for step_coeffs, run in ((k, len(list(g))) for k, g in itertools.groupby(schedule)):
      step = functools.partial(newton_schulz_step, coeffs=step_coeffs)
      flops = 4 * m * m * n + 2 * m**3
      flat = matrix_iteration(flat, step, run, flops_per_step=flops, impl="tpu", interpret=interpret)
    y = flat.reshape(y.shape)
  else:
    for step_coeffs in schedule:  # unrolled: XLA's cost analysis counts a while loop's body once
      y = _newton_schulz_step_xla(y, step_coeffs)
  if tall:  # behind a barrier, so that XLA cannot fold the transpose into the last dot (as a slow TN dot on CPU)
    y = jnp.swapaxes(jax.lax.optimization_barrier(y), -1, -2)
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
  ns_steps: int | None = None,
  ns_coeffs: NSCoeffsSpec = NS_COEFFS,
  ns_dtype: Any = jnp.bfloat16,
  ns_eps: float = 1e-7,
  rms_scale: float = 0.2,
  muon_dims: MuonDimsSpec | None = None,
  param_shardings: Any = None,
  ns_impl: str = "auto",
  ns_interpret: bool = False,
  ns_gram: bool | str = "auto",
  ns_gram_restarts: Sequence[int] = GRAM_RESTARTS,
) -> optax.GradientTransformation:
  """Turns the gradients of Muon leaves into RMS-matched orthogonalised momentum; other leaves pass through.

  The output is the *direction* (no learning rate, no weight decay, no sign flip): chain it with
  `optax.add_decayed_weights` and `optax.scale_by_learning_rate`, as `muon_clip` does.

  Args:
    momentum: μ in M ← μ M + G.
    nesterov: feed G + μ M (True) or M (False) to Newton–Schulz.
    ns_steps, ns_coeffs, ns_dtype, ns_eps, ns_impl, ns_interpret, ns_gram, ns_gram_restarts: see `newton_schulz`
      (steps, coeffs: the schedule, dtype, eps, impl, interpret, gram, gram_restarts).
    rms_scale: the update is O · rms_scale · sqrt(max(I, J)), giving it an RMS of about rms_scale, like AdamW's.
    muon_dims: routing per leaf (see `resolve_muon_dims`); leaves with None are returned unchanged. A function
      is called on params at init and on the updates at update, so it must depend only on paths and shapes.
    param_shardings: None, or the params' layout as a pytree like params of `jax.sharding.NamedSharding` (or a
      function params -> such a pytree). Given it (and called under jit), Newton–Schulz runs on whole matrices
      with the batch of matrices spread over the mesh, under shard_map (see `ns_sharding.py`); None leaves the
      layout to XLA, which cannot partition the Pallas kernel: on a mesh, ns_impl="pallas" needs this.
  """

  ns_schedule(ns_coeffs, ns_steps)  # raises on a bad schedule now rather than at the first update

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
    ns = lambda x, impl=ns_impl: newton_schulz(
      x, ns_steps, ns_coeffs, ns_dtype, ns_eps, impl, ns_interpret, ns_gram, ns_gram_restarts
    )
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
  "NS_SCHEDULES",
  "POLAR_EXPRESS_COEFFS",
  "GRAM_RESTARTS",
  "gram_newton_schulz",
  "ns_schedule",
  "ADAMW_NAME_HINTS",
  "MuonDims",
  "MuonState",
  "newton_schulz",
  "newton_schulz_step",
  "default_muon_dims",
  "resolve_muon_dims",
  "scale_by_muon",
)
