"""mla_decode: decode attention over the MLA latent cache, with a backend switch.

Dimensions: B batch, H heads, C latent rank (K2: 512), R rope dim (K2: 64), T cache
length. With the absorbed weights (q~ = W_uk^T q_nope), decode is multi-query
attention with one (C+R)-dim key [latent, k_rope] and the C-dim latent as value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._common import check_float, check_int, resolve_impl, round_up
from pallas_kernels.mla_decode import gpu, tpu
from pallas_kernels.mla_decode.reference import mla_decode_reference

_KERNELS = {"tpu": tpu, "gpu": gpu}


def mla_decode(
  q_latent: jax.Array,
  q_rope: jax.Array,
  cache_latent: jax.Array,
  cache_rope: jax.Array,
  lengths: jax.Array,
  softmax_scale: float,
  *,
  impl: str = "auto",
  interpret: bool = False,
  block_size: int | None = None,
) -> jax.Array:
  """Attention of H query heads over the first lengths[b] cache positions.

  Args:
    q_latent: [B, H, C] absorbed no-rope query; q_rope: [B, H, R] rope query.
    cache_latent: [B, T, C] normalised latent (keys and values); cache_rope: [B, T, R].
    lengths: [B] int32, valid positions per sequence (0 gives a zero output).
    softmax_scale: logit scale (K2: 192**-0.5 * mscale**2, not (C+R)**-0.5).
    impl: "auto" | "xla" | "tpu" | "gpu"; interpret: Pallas interpret mode (CPU).
    block_size: cache positions per kernel step (None: backend default).

  Returns:
    [B, H, C] in q_latent's dtype (softmax and accumulation in f32).
  """
  b, h, c = q_latent.shape
  t = cache_latent.shape[1]
  if (
    q_rope.shape[:2] != (b, h)
    or cache_latent.shape != (b, t, c)
    or cache_rope.shape != (b, t, q_rope.shape[2])
    or lengths.shape != (b,)
  ):
    raise ValueError(
      f"shape mismatch: q_latent {q_latent.shape}, q_rope {q_rope.shape}, "
      f"cache_latent {cache_latent.shape}, cache_rope {cache_rope.shape}, "
      f"lengths {lengths.shape}"
    )
  check_float(q_latent=q_latent, q_rope=q_rope, cache_latent=cache_latent, cache_rope=cache_rope)
  check_int("lengths", lengths)
  impl = resolve_impl(impl)
  lengths = jnp.minimum(lengths.astype(jnp.int32), t)
  if impl == "xla":
    return mla_decode_reference(q_latent, q_rope, cache_latent, cache_rope, lengths, softmax_scale)
  kernels = _KERNELS[impl]
  block = block_size or kernels.default_block(t)
  if impl == "tpu" and t % block:
    # The TPU kernel needs whole blocks; padding copies the cache (pick T % block == 0).
    tp = round_up(t, block)
    cache_latent = jnp.pad(cache_latent, ((0, 0), (0, tp - t), (0, 0)))
    cache_rope = jnp.pad(cache_rope, ((0, 0), (0, tp - t), (0, 0)))
  return kernels.mla_decode(
    q_latent, q_rope, cache_latent, cache_rope, lengths, scale=float(softmax_scale), block=block, interpret=interpret
  )
