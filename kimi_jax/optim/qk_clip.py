"""qk-clip: rescale the query/key weights of each attention head whose max logit exceeded τ this step.

Dimension letters
  H        query heads: one max logit per head;  G  kv heads (GQA): query head h reads kv head h // (H / G)
  Dh       MHA/GQA head dim;  Dn, Dr, Dv  MLA nope, rope and value head dims
  X, Y     the two matrix axes of a kernel (its last two axes)
  ...      leading stack axes shared by a max-logits array [..., H] and its kernels [..., X, Y] (stacked layers L)

Layout: one of a kernel's two matrix axes (`axis`: -1 for our [in, out] kernels, -2 for torch-style [out, in])
holds the heads head-major: head j owns entries j·W + [0, W) of that axis, W being the per-head width, which a
rule splits into segments (MLA q_b: Dn nope then Dr rope columns).

With S^h the head's largest pre-softmax logit in this step's forward pass, γ_h = τ / S^h where S^h > τ, else 1.
A rule maps γ [..., H] to one factor per (kernel head, segment); the clip multiplies W + u by those factors, which
scales head h's logits by exactly γ_h, so its max logit becomes min(S^h, τ).
"""

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kimi_jax.optim._tree import leaf_paths, match_spec

ParamPath = str | Sequence[str]  # "moe_layers/attn/q_b/kernel" or ("moe_layers", "attn", "q_b", "kernel")


@dataclasses.dataclass(frozen=True)
class ClipTarget:
  """One kernel a rule rescales.

  path: '/'-joined param path.  segments: per-head widths along `axis`.  axis: -1 or -2.
  factors: γ [..., H] -> [..., heads of this kernel, len(segments)] multiplicative factors.
  """

  path: str
  segments: tuple[int, ...]
  factors: Callable[[jax.Array], jax.Array]
  axis: int = -1


@dataclasses.dataclass(frozen=True)
class QKClipRule:
  """How the max logits [..., num_heads] of one attention map onto its kernels' heads."""

  num_heads: int
  targets: tuple[ClipTarget, ...]


QKClipSpec = Any | Callable[[Any], Any]  # pytree of QKClipRule (keys as in max_logits), or params -> such a pytree


def _path(p: ParamPath) -> str:
  return p if isinstance(p, str) else "/".join(map(str, p))


def _check_axis(axis: int) -> int:
  if axis not in (-1, -2):
    raise ValueError(f"qk-clip head axis must be -1 ([in, out] kernels) or -2 ([out, in] kernels), got {axis}.")
  return axis


def mha_qk_clip(
  q: ParamPath, k: ParamPath, *, num_heads: int, head_dim: int, num_kv_heads: int | None = None, axis: int = -1
) -> QKClipRule:
  """qk-clip for multi-head / grouped-query attention with kernels W_q [..., X, H·Dh] and W_k [..., X, G·Dh].

  MHA (G = H): W_q^h and W_k^h are scaled by √γ_h. GQA: kv head g is shared by a group of query heads, so it is
  scaled by √γ_min (γ_min: the group's smallest γ, i.e. the strongest clip it needs) and each query head h by
  γ_h / √γ_min. Every head's logits are then scaled by exactly γ_h: clipped heads land on τ and the others keep
  their logits (their W_q^h grows by 1/√γ_min to compensate for the shared key's shrinkage).
  """
  kv_heads = num_kv_heads or num_heads
  if num_heads % kv_heads:
    raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={kv_heads}.")
  group = num_heads // kv_heads

  def group_min(gamma):  # [..., H] -> [..., G]
    return gamma.reshape(*gamma.shape[:-1], kv_heads, group).min(axis=-1)

  def q_factors(gamma):
    return (gamma / jnp.repeat(jnp.sqrt(group_min(gamma)), group, axis=-1))[..., None]

  def k_factors(gamma):
    return jnp.sqrt(group_min(gamma))[..., None]

  axis = _check_axis(axis)
  return QKClipRule(
    num_heads,
    (ClipTarget(_path(q), (head_dim,), q_factors, axis), ClipTarget(_path(k), (head_dim,), k_factors, axis)),
  )


def mla_qk_clip(
  q_b: ParamPath,
  kv_b: ParamPath,
  *,
  num_heads: int,
  qk_nope_head_dim: int,
  qk_rope_head_dim: int,
  v_head_dim: int,
  axis: int = -1,
) -> QKClipRule:
  """qk-clip for Multi-head Latent Attention (DeepSeek-V3 / Kimi K2).

  q_b [..., Cq, H·(Dn+Dr)]: per head, the Dn q_nope columns are scaled by √γ_h and the Dr q_rope columns by γ_h.
  kv_b [..., C, H·(Dn+Dv)]: per head, the Dn k_nope columns by √γ_h; the Dv value columns are untouched.
  The rope key k_rope (in kv_a) is shared by all heads, so it is left alone and q_rope takes the whole γ_h.
  """

  def q_factors(gamma):
    return jnp.stack([jnp.sqrt(gamma), gamma], axis=-1)

  def kv_factors(gamma):
    return jnp.stack([jnp.sqrt(gamma), jnp.ones_like(gamma)], axis=-1)

  axis = _check_axis(axis)
  return QKClipRule(
    num_heads,
    (
      ClipTarget(_path(q_b), (qk_nope_head_dim, qk_rope_head_dim), q_factors, axis),
      ClipTarget(_path(kv_b), (qk_nope_head_dim, v_head_dim), kv_factors, axis),
    ),
  )


def _rules(spec: QKClipSpec, params: Any) -> tuple[Any, list[str], list[QKClipRule]]:
  """(spec tree, '/'-joined key of each rule, the rules) with `spec` applied to params if it is a function."""
  tree = spec(params) if callable(spec) else spec
  rules = jax.tree.leaves(tree)
  if not all(isinstance(r, QKClipRule) for r in rules):
    raise TypeError(f"qk_clip spec leaves must be QKClipRule (from mha_qk_clip / mla_qk_clip), got {rules!r}.")
  return tree, leaf_paths(tree), rules


def _kernel(key: str, rule: QKClipRule, target: ClipTarget, kernels: dict[str, jax.Array]) -> jax.Array:
  """The target's kernel, checked to be a [..., X, Y] matrix holding the rule's heads along target.axis."""
  if target.path not in kernels:
    raise ValueError(f"qk_clip rule '{key}' targets param '{target.path}', which is not in params.")
  kernel = kernels[target.path]
  heads = jax.eval_shape(target.factors, jax.ShapeDtypeStruct((rule.num_heads,), jnp.float32)).shape[0]
  if kernel.ndim < 2 or kernel.shape[target.axis] != heads * sum(target.segments):
    raise ValueError(
      f"qk_clip rule '{key}': param '{target.path}' has shape {kernel.shape}, but axis {target.axis} should hold "
      f"{heads} heads of segments {target.segments} = {heads * sum(target.segments)} entries."
    )
  return kernel


def _column_factors(target: ClipTarget, gamma: jax.Array, kernel: jax.Array) -> jax.Array:
  """Factors for every entry of `kernel` along target.axis, shaped to broadcast: [..., 1, Y] or [..., X, 1]."""
  per_segment = target.factors(gamma)  # [..., heads, len(segments)]
  per_column = jnp.repeat(per_segment, np.array(target.segments), axis=-1, total_repeat_length=sum(target.segments))
  per_column = per_column.reshape(*gamma.shape[:-1], kernel.shape[target.axis])
  return jnp.expand_dims(per_column, -2 if target.axis == -1 else -1)


def scale_by_qk_clip(
  spec: QKClipSpec, tau: float = 100.0, axis_name: str | None = None
) -> optax.GradientTransformationExtraArgs:
  """qk-clip as the last stage of an optimizer: returns updates u' such that params + u' = clip(params + u).

  `update(updates, state, params, *, max_logits)`: max_logits is a pytree with the spec's structure holding, for
  each rule, f32[..., H] per-head max logits whose leading axes equal the leading (batch) axes of the rule's
  kernels. Entries whose factor is 1 keep u bit for bit.

  Args:
    spec: pytree of QKClipRule keyed like max_logits, or a function params -> such a pytree (e.g. one that drops
      attentions absent from this model's params).
    tau: the logit cap τ.
    axis_name: set when calling update inside shard_map / pmap with per-shard max logits: they are pmax'd over
      this axis first. Under plain jit with global (sharded) arrays the model's max logits are already global.
  """

  def init_fn(params):
    _, keys, rules = _rules(spec, params)
    kernels = dict(zip(leaf_paths(params), jax.tree.leaves(params)))
    for key, rule in zip(keys, rules):
      for target in rule.targets:
        _kernel(key, rule, target, kernels)
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, max_logits=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("qk-clip needs the params: call tx.update(grads, state, params, max_logits=...).")
    tree, keys, rules = _rules(spec, params)
    if max_logits is None:
      raise ValueError(
        f"this optimizer was built with a qk_clip spec, so update needs max_logits=<pytree like {keys}> holding "
        "each attention's per-head max logits from this step's forward pass (or build it with qk_clip_tau=None)."
      )
    logits = match_spec(tree, max_logits, "max_logits", lambda x: False, tree_name="qk_clip spec")
    if axis_name is not None:
      logits = jax.lax.pmax(logits, axis_name)
    paths, leaves = leaf_paths(params), jax.tree.leaves(params)
    kernels = dict(zip(paths, leaves))
    factors: dict[str, jax.Array] = {}
    for key, rule, s in zip(keys, rules, logits):
      s = jnp.asarray(s, jnp.float32)
      for target in rule.targets:
        kernel = _kernel(key, rule, target, kernels)
        if s.shape != (*kernel.shape[:-2], rule.num_heads):
          raise ValueError(
            f"max_logits '{key}' has shape {s.shape}, expected {(*kernel.shape[:-2], rule.num_heads)}: "
            f"[leading axes of its kernel '{target.path}' {kernel.shape}, num_heads={rule.num_heads}]."
          )
        gamma = jnp.where(s > tau, tau / s, 1.0)
        f = _column_factors(target, gamma, kernel)
        factors[target.path] = factors[target.path] * f if target.path in factors else f

    def clip(path, u, w):
      if path not in factors:
        return u
      f = factors[path]
      # (w + u)·f − w, written so that f == 1 gives back u exactly.
      return (u.astype(jnp.float32) * f + w.astype(jnp.float32) * (f - 1.0)).astype(u.dtype)

    new_leaves = [clip(p, u, w) for p, u, w in zip(paths, jax.tree.leaves(updates), leaves)]
    return jax.tree.unflatten(jax.tree.structure(updates), new_leaves), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = ("ClipTarget", "QKClipRule", "mha_qk_clip", "mla_qk_clip", "scale_by_qk_clip")
