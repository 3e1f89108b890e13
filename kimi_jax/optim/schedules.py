"""Learning-rate schedules (functions of the integer step count, as optax expects)."""

import math

import jax.numpy as jnp
import optax


def warmup_stable_decay(peak: float, warmup: int, stable: int, decay: int, final: float) -> optax.Schedule:
  """Warmup–stable–decay: linear 0 → peak over `warmup` steps, `stable` steps at peak, cosine from peak to
  `final` over `decay` steps, then `final` for ever.

  Kimi K2: `warmup_stable_decay(2e-4, 500, stable, decay, 2e-5)` with stable + decay filling the run.
  """
  if min(warmup, stable, decay) < 0:
    raise ValueError(f"warmup, stable and decay must be >= 0, got {warmup}, {stable}, {decay}.")
  decay_start = warmup + stable

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    ramp = peak * step / max(warmup, 1)
    t = jnp.clip((step - decay_start) / decay, 0.0, 1.0) if decay else 1.0
    cosine = final + (peak - final) * 0.5 * (1.0 + jnp.cos(math.pi * t))
    return jnp.where(step < warmup, ramp, jnp.where(step < decay_start, peak, cosine))

  return schedule


__all__ = ("warmup_stable_decay",)
