"""MuonClip routing and qk-clip spec for kimi_jax's own parameter tree.

Takes plain ints (never the model or its config) so that kimi_jax.optim stays importable with jax + optax only.

The tree (nested dicts; kernels are [in, out]; L stacked layers; either stack may be absent):
  embed/embedding [V, D], final_norm/scale [D], lm_head/kernel [D, V]                       -> AdamW
  {dense_layers,moe_layers}/.../scale  (attn_norm, mlp_norm, q_a_norm, kv_a_norm) [L, ·]    -> AdamW
  {dense_layers,moe_layers}/... every other leaf: attention q_a, q_b, kv_a, kv_b, o; dense mlp gate/up/down;
      router [L, D, E]; experts [L, E, D, Fe] / [L, E, Fe, D]; shared expert                -> Muon on (-2, -1)
"""

from typing import Any

import jax

from kimi_jax.optim._tree import path_str
from kimi_jax.optim.muon import MuonDims
from kimi_jax.optim.qk_clip import QKClipRule, mla_qk_clip

STACKS = ("dense_layers", "moe_layers")
ADAMW_TOP_LEVEL = ("embed", "final_norm", "lm_head")


def kimi_muon_dims(params: Any) -> Any:
  """`muon_dims` for kimi_jax's params: a pytree like params of None (AdamW) or (-2, -1) (Muon).

  Raises ValueError naming any leaf outside the layout above, so that a new parameter gets routed on purpose.
  """

  def route(path, leaf) -> MuonDims:
    keys = path_str(path).split("/")
    if keys[0] in ADAMW_TOP_LEVEL or (keys[0] in STACKS and keys[-1] == "scale"):
      return None
    if keys[0] in STACKS and leaf.ndim >= 3:  # [L, X, Y] or [L, E, X, Y]
      return (-2, -1)
    raise ValueError(f"kimi_muon_dims does not know how to route param '{'/'.join(keys)}' {leaf.shape}.")

  return jax.tree_util.tree_map_with_path(route, params)


def kimi_qk_clip(num_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int):
  """The `qk_clip` spec for kimi_jax: params -> {stack: MLA rule} for each stack present in params.

  Each rule maps the model's max_logits[stack] f32[L, H] onto that stack's attn/q_b and attn/kv_b kernels.
  """

  def spec(params) -> dict[str, QKClipRule]:
    return {
      stack: mla_qk_clip(
        f"{stack}/attn/q_b/kernel",
        f"{stack}/attn/kv_b/kernel",
        num_heads=num_heads,
        qk_nope_head_dim=qk_nope_head_dim,
        qk_rope_head_dim=qk_rope_head_dim,
        v_head_dim=v_head_dim,
      )
      for stack in STACKS
      if stack in params
    }

  return spec


__all__ = ("kimi_muon_dims", "kimi_qk_clip")
