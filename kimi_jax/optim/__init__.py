"""MuonClip for JAX/optax (Kimi K2's optimizer). Depends on jax and optax only.

tx = muon_clip(warmup_stable_decay(2e-4, 500, stable, decay, 2e-5),
               muon_dims=kimi_muon_dims, qk_clip=kimi_qk_clip(H, Dn, Dr, Dv))
updates, opt_state = tx.update(grads, opt_state, params, max_logits=max_logits)
"""

from kimi_jax.optim.kimi import kimi_muon_dims, kimi_qk_clip
from kimi_jax.optim.muon import (
  ADAMW_NAME_HINTS,
  GRAM_RESTARTS,
  NS_COEFFS,
  NS_SCHEDULES,
  POLAR_EXPRESS_COEFFS,
  MuonState,
  default_muon_dims,
  gram_newton_schulz,
  newton_schulz,
  newton_schulz_step,
  ns_schedule,
  resolve_muon_dims,
  scale_by_muon,
)
from kimi_jax.optim.muon_clip import muon_clip
from kimi_jax.optim.qk_clip import ClipTarget, QKClipRule, mha_qk_clip, mla_qk_clip, scale_by_qk_clip
from kimi_jax.optim.schedules import warmup_stable_decay

__all__ = (
  "ADAMW_NAME_HINTS",
  "GRAM_RESTARTS",
  "NS_COEFFS",
  "NS_SCHEDULES",
  "POLAR_EXPRESS_COEFFS",
  "ClipTarget",
  "MuonState",
  "QKClipRule",
  "default_muon_dims",
  "gram_newton_schulz",
  "kimi_muon_dims",
  "kimi_qk_clip",
  "mha_qk_clip",
  "mla_qk_clip",
  "muon_clip",
  "newton_schulz",
  "newton_schulz_step",
  "ns_schedule",
  "resolve_muon_dims",
  "scale_by_muon",
  "scale_by_qk_clip",
  "warmup_stable_decay",
)
