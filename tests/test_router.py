"""Group-limited routing (n_group > 1, DeepSeek-V3's 8 groups / top 4; Kimi K2 has 1 / 1).

Which value masked groups get before the top-K is where the references disagree: transformers' DeepseekV3
(`DeepseekV3TopkRouter.get_topk_indices`, the numerics reference here) fills them with 0.0, DeepSeek-V3's own
inference gate with -inf. They differ when a kept group's experts score below zero after the bias (s + b < 0):
then 0.0 lets an expert of a dropped group win. We follow transformers; this pins it.
"""

import jax.numpy as jnp
import numpy as np

from kimi_jax.config import tiny
from kimi_jax.layers.moe import route

CFG = tiny().replace(n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5)


def transformers_topk(scores, bias, cfg, fill):
  """NumPy transcription of transformers 5.x `get_topk_indices` (fill 0.0) and DeepSeek's gate (fill -inf)."""
  choice = scores + bias
  t, e = choice.shape
  grouped = choice.reshape(t, cfg.n_group, e // cfg.n_group)
  group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)  # sum of each group's best two
  keep = np.argsort(-group_scores, axis=-1, kind="stable")[:, :cfg.topk_group]
  mask = np.zeros((t, cfg.n_group), bool)
  np.put_along_axis(mask, keep, True, axis=-1)
  masked = np.where(np.repeat(mask, e // cfg.n_group, axis=-1), choice, fill)
  return np.sort(np.argsort(-masked, axis=-1, kind="stable")[:, :cfg.num_experts_per_tok], axis=-1)


def test_masked_groups_are_filled_with_zero_like_transformers():
  # Groups {0,1} and {2,3} win, but only experts 0 and 2 stay positive after the bias: the third pick is a 0.0 of a
  # dropped group under transformers' rule (which one is a tie, unspecified in torch too) and expert 3 under
  # DeepSeek's -inf.
  scores = np.array([[0.9, 0.2, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1]], np.float32)
  bias = np.array([0.0, -0.5, 0.0, -0.2, -0.2, -0.2, -0.2, -0.2], np.float32)
  dropped = lambda picks: {int(e) for e in picks.reshape(-1) if e >= 4}
  want = transformers_topk(scores, bias, CFG, 0.0)
  assert set(want[0]) - dropped(want) == {0, 2} and len(dropped(want)) == 1
  assert list(transformers_topk(scores, bias, CFG, -np.inf)[0]) == [0, 2, 3]  # the case tells the rules apart
  weights, idx = route(jnp.asarray(scores), jnp.asarray(bias), CFG)
  idx = np.asarray(idx)
  assert set(idx[0]) - dropped(idx) == {0, 2} and len(dropped(idx)) == 1
  # Weights are the chosen unbiased scores, normalised, times the scaling factor.
  chosen = np.take_along_axis(scores, idx, -1)
  np.testing.assert_allclose(np.asarray(weights), chosen / chosen.sum(-1, keepdims=True) * 2.5, rtol=1e-6)


def test_group_routing_matches_transformers_on_random_scores():
  rng = np.random.default_rng(0)
  scores = 1 / (1 + np.exp(-rng.normal(size=(64, 8)))).astype(np.float32)
  bias = rng.normal(0, 0.5, 8).astype(np.float32)
  _, idx = route(jnp.asarray(scores), jnp.asarray(bias), CFG)
  np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), transformers_topk(scores, bias, CFG, 0.0))
