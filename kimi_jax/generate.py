"""Sampling from the model by full forward passes over a fixed-size token buffer (one compile).

Letters: B batch, N buffer length (prompt + new tokens), V vocab.

This is the simple path used by the demo; decoding with the MLA latent cache replaces it for real use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample(model, prompt: list[int], *, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
           stop_token: int | None = None) -> list[int]:
  """Continue `prompt` by up to `max_new_tokens` tokens (greedy when temperature == 0). Returns new tokens."""
  if not prompt:
    raise ValueError("sample() needs a non-empty prompt")
  total = len(prompt) + max_new_tokens
  buffer = jnp.zeros((1, total), jnp.int32).at[0, :len(prompt)].set(jnp.asarray(prompt, jnp.int32))

  @nnx.jit
  def step(model, buffer, cursor, key):
    logits, _ = model(buffer)
    last = jax.lax.dynamic_index_in_dim(logits[0], cursor - 1, keepdims=False)  # [V]
    if temperature > 0:
      token = jax.random.categorical(key, last / temperature)
    else:
      token = jnp.argmax(last)
    return buffer.at[0, cursor].set(token.astype(jnp.int32)), token

  key = jax.random.key(seed)
  out = []
  for cursor in range(len(prompt), total):
    key, sub = jax.random.split(key)
    buffer, token = step(model, buffer, cursor, sub)
    token = int(token)
    if token == stop_token:
      break
    out.append(token)
  return out
