"""The optimizer a run config asks for: its learning-rate schedule (cosine, WSD or linear, with warm-up), global-norm
clipping, then AdamW or MuonClip with the Newton–Schulz implementation chosen for the platform."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
import optax

from kimi_jax import backend
from kimi_jax.config import ModelConfig
from kimi_jax.optim import kimi_muon_dims, kimi_qk_clip, muon_clip, warmup_stable_decay


def learning_rate_schedule(c: ml_collections.ConfigDict) -> optax.Schedule:
  final = c.learning_rate * c.final_learning_rate_ratio
  if c.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=c.learning_rate,
      warmup_steps=c.warmup_steps,
      decay_steps=max(c.steps, c.warmup_steps + 1),
      end_value=final,
    )
  if c.schedule == "wsd":
    stable = max(c.steps - c.warmup_steps - c.decay_steps, 0)
    return warmup_stable_decay(c.learning_rate, c.warmup_steps, stable, c.decay_steps, final)
  if c.schedule == "linear":  # warm-up, then a straight line to `final` at the last step (K2's anneal stages)
    decay = optax.linear_schedule(c.learning_rate, final, max(c.steps - c.warmup_steps, 1))
    if not c.warmup_steps:
      return decay
    return optax.join_schedules([optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps), decay], [c.warmup_steps])
  raise ValueError(f"config.schedule {c.schedule!r} is not supported (choose cosine, wsd or linear)")


def schedule_phases(c: ml_collections.ConfigDict) -> list[tuple[str, int, int]]:
  """The phases of `learning_rate_schedule(c)` as (name, first step, end step) in optimizer steps, covering
  [0, c.steps); empty phases are left out."""
  warmup = min(c.warmup_steps, c.steps)
  if c.schedule == "wsd":
    decay_start = max(c.steps - c.decay_steps, warmup)
    bounds = [("warmup", 0, warmup), ("stable", warmup, decay_start), ("cosine decay", decay_start, c.steps)]
  elif c.schedule in ("cosine", "linear"):
    bounds = [("warmup", 0, warmup), (f"{c.schedule} decay", warmup, c.steps)]
  else:
    learning_rate_schedule(c)  # raises, naming the schedule
  return [(name, a, b) for name, a, b in bounds if b > a]


# config.muon_ns_gram -> muon_clip's ns_gram.
_NS_GRAM = {"on": True, "off": False, "auto": "auto"}


def build_optimizer(
  c: ml_collections.ConfigDict, cfg: ModelConfig, param_shardings: Any = None
) -> optax.GradientTransformationExtraArgs:
  """Global-norm clipping, then AdamW or MuonClip (whose qk-clip reads the forward pass's max logits).

  param_shardings (the params' NamedShardings) lets MuonClip lay Newton–Schulz out over the mesh when
  `c.spread_newton_schulz` is on.
  """
  schedule = learning_rate_schedule(c)
  if c.optimizer == "adamw":
    tx = optax.adamw(schedule, b1=c.adam_b1, b2=c.adam_b2, weight_decay=c.weight_decay)
  elif c.optimizer == "muon_clip":
    if c.muon_ns_gram not in _NS_GRAM:
      raise ValueError(f"config.muon_ns_gram {c.muon_ns_gram!r} not in {sorted(_NS_GRAM)}")
    spread = param_shardings if c.spread_newton_schulz else None
    # XLA cannot partition the Pallas kernel: on a mesh it runs only inside the spread layout's shard_map.
    ns_impl = c.muon_ns_impl if spread is not None or param_shardings is None else "xla"
    tx = muon_clip(
      schedule,
      weight_decay=c.weight_decay,
      adam_b1=c.adam_b1,
      adam_b2=c.adam_b2,
      qk_clip_tau=qk_clip_tau(c),
      muon_dims=kimi_muon_dims,
      ns_dtype=jnp.dtype(c.muon_ns_dtype),
      ns_coeffs=c.muon_ns_schedule,
      ns_gram=_NS_GRAM[c.muon_ns_gram],
      **newton_schulz_impl(ns_impl),
      param_shardings=spread,
      qk_clip=kimi_qk_clip(cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim),
    )
  else:
    raise ValueError(f"config.optimizer {c.optimizer!r} is not supported (choose adamw or muon_clip)")
  return optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx)


def newton_schulz_impl(impl: str) -> dict:
  """muon_clip's ns_impl ("xla" or "pallas", never its own "auto", which would ask this host's backend) and
  ns_interpret for `impl` on `backend.platform()`, the platform being compiled for."""
  impl = backend.resolve("newton_schulz", impl)
  # pallas_kernels.matrix_iteration has a TPU kernel only: elsewhere "pallas" runs that kernel interpreted.
  interpret = impl == "pallas" and backend.pallas_options(native=("tpu",)).get("interpret", False)
  return {"ns_impl": impl, "ns_interpret": interpret}


def qk_clip_tau(c: ml_collections.ConfigDict) -> float | None:
  """τ for MuonClip; None (no clip) when the config gives None or a value <= 0 (the CLI cannot say None)."""
  return c.qk_clip_tau if c.qk_clip_tau is not None and c.qk_clip_tau > 0 else None
