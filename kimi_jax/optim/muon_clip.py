"""MuonClip (Kimi K2's optimizer): Muon for hidden matrices, AdamW for the rest, then qk-clip.

Per step, with learning rate η (float or schedule) and weight decay λ, for every param W:
  Muon leaves   W ← W − η · (O_scaled + λ W)        O_scaled from `scale_by_muon`
  AdamW leaves  W ← W − η · (m̂ / (√v̂ + eps) + λ W)  bias-corrected Adam moments (β1, β2), not NAdam
  qk-clip       W ← clip(W), per attention head whose max logit S^h exceeded τ (see `qk_clip.py`)
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from kimi_jax.optim.muon import NS_COEFFS, MuonDimsSpec, NSCoeffsSpec, resolve_muon_dims, scale_by_muon
from kimi_jax.optim.qk_clip import QKClipSpec, scale_by_qk_clip


def muon_clip(
  learning_rate: float | optax.Schedule,
  *,
  weight_decay: float = 0.1,
  momentum: float = 0.95,
  nesterov: bool = True,
  ns_steps: int | None = None,
  ns_coeffs: NSCoeffsSpec = NS_COEFFS,
  ns_dtype: Any = jnp.bfloat16,
  ns_impl: str = "auto",
  ns_interpret: bool = False,
  ns_gram: bool | str = "auto",
  rms_scale: float = 0.2,
  adam_b1: float = 0.9,
  adam_b2: float = 0.95,
  adam_eps: float = 1e-8,
  qk_clip_tau: float | None = 100.0,
  qk_clip: QKClipSpec | None = None,
  muon_dims: MuonDimsSpec | None = None,
  param_shardings: Any = None,
  axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """The MuonClip optimizer as one optax transformation.

  Usage: `updates, state = tx.update(grads, state, params, max_logits=max_logits)`, then
  `optax.apply_updates(params, updates)`. params are required (weight decay, qk-clip). It composes like any optax
  transformation, e.g. `optax.chain(optax.clip_by_global_norm(1.0), muon_clip(...))` (chain forwards max_logits).
  Muon momentum is kept in float32; Adam moments in the params' dtype (optax's default).

  Args:
    learning_rate: η, a float or an optax schedule of the step count; shared by both branches.
    weight_decay: λ, decoupled (multiplied by η, not by the RMS scale), for every param.
    momentum, nesterov, ns_steps, ns_coeffs, ns_dtype, ns_impl, ns_gram, rms_scale: Muon settings (see
      `scale_by_muon` and `newton_schulz`); ns_coeffs is the schedule (K2's quintic ×5 by default, "polar_express",
      or per-step (a, b, c) triples); ns_gram iterates rectangular matrices on their Gram matrix (default "auto":
      wherever the Pallas kernel does not run; False: the plain form); ns_impl "auto" runs Newton–Schulz in a
      Pallas kernel on TPU, "xla" everywhere else; ns_interpret runs that kernel in interpret mode (CPU tests).
    adam_b1, adam_b2, adam_eps: AdamW settings for the non-Muon leaves.
    qk_clip_tau: τ; None disables qk-clip (max_logits is then ignored).
    qk_clip: pytree of `QKClipRule` keyed like the model's max_logits, or params -> such a pytree (see
      `mha_qk_clip`, `mla_qk_clip`, `kimi_qk_clip`). None: no qk-clip, max_logits ignored. Otherwise update
      requires max_logits matching it.
    muon_dims: routing, None (AdamW) or (a, b) per leaf, as a pytree or params -> pytree; default
      `default_muon_dims` (ndim >= 2 → (-2, -1) unless the path names an embedding / lm_head / norm / bias).
    param_shardings: the params' NamedShardings (pytree or function), to run Newton–Schulz on whole matrices
      spread over the mesh instead of partitioned by XLA (see `scale_by_muon`). None: XLA decides.
    axis_name: pmax the max logits over this mapped axis (inside shard_map / pmap only; see `scale_by_qk_clip`).

  Returns:
    An optax.GradientTransformationExtraArgs whose state is a dict of stage states: "muon" (momentum), "adamw"
    (Adam moments), "weight_decay", "learning_rate" (the step count, for a schedule) and, with qk-clip, "qk_clip".
  """

  def adamw_mask(tree):
    dims = resolve_muon_dims(tree, muon_dims)
    return jax.tree.unflatten(jax.tree.structure(tree), [d is None for d in dims])

  stages = [
    (
      "muon",
      scale_by_muon(
        momentum,
        nesterov,
        ns_steps,
        ns_coeffs,
        ns_dtype=ns_dtype,
        ns_impl=ns_impl,
        ns_interpret=ns_interpret,
        ns_gram=ns_gram,
        rms_scale=rms_scale,
        muon_dims=muon_dims,
        param_shardings=param_shardings,
      ),
    ),
    ("adamw", optax.masked(optax.scale_by_adam(adam_b1, adam_b2, adam_eps), adamw_mask)),
    ("weight_decay", optax.add_decayed_weights(weight_decay)),
    ("learning_rate", optax.scale_by_learning_rate(learning_rate)),
  ]
  if qk_clip is not None and qk_clip_tau is not None:
    stages.append(("qk_clip", scale_by_qk_clip(qk_clip, qk_clip_tau, axis_name)))
  return optax.named_chain(*stages)


__all__ = ("muon_clip",)
