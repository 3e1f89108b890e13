"""Group-limited routing (n_group > 1, DeepSeek-V3's 8 groups / top 4; Kimi K2 has 1 / 1).

Which value masked groups get before the top-K: transformers 4.x's DeepseekV3 (`get_topk_indices`) filled them with
0.0; transformers 5.24 (`DeepseekV3TopkRouter.forward`, `masked_fill(~score_mask.bool(), float("-inf"))`) and
DeepSeek-V3's own inference gate use -inf, and so does `route()`. The rules differ when fewer than K experts of the
kept groups score above zero after the bias (s + b < 0): then 0.0 lets an expert of a dropped group win.
`router_groups.npz` (tests/reference/make_router_fixture.py) holds transformers 5.24's router on random inputs and
on such a case.
"""

from helpers.paths import ROUTER_GROUPS
import jax.numpy as jnp
import numpy as np

from kimi_jax.config import tiny
from kimi_jax.layers.moe import route

CFG = tiny().replace(n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5)
CFG16 = tiny().replace(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)


def transformers_topk(scores, bias, cfg, fill):
  """NumPy transcription of transformers' group-limited top-K: fill 0.0 as 4.x, -inf as 5.24 and DeepSeek's gate."""
  choice = scores + bias
  t, e = choice.shape
  grouped = choice.reshape(t, cfg.n_group, e // cfg.n_group)
  group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)  # sum of each group's best two
  keep = np.argsort(-group_scores, axis=-1, kind="stable")[:, : cfg.topk_group]
  mask = np.zeros((t, cfg.n_group), bool)
  np.put_along_axis(mask, keep, True, axis=-1)
  masked = np.where(np.repeat(mask, e // cfg.n_group, axis=-1), choice, fill)
  return np.sort(np.argsort(-masked, axis=-1, kind="stable")[:, : cfg.num_experts_per_tok], axis=-1)


def sorted_route(scores, bias, cfg):
  """route() with each row's experts sorted ascending (as the fixture stores them), weights kept aligned."""
  weights, idx = route(jnp.asarray(scores), jnp.asarray(bias), cfg)
  order = np.argsort(np.asarray(idx), -1)
  return np.take_along_axis(np.asarray(idx), order, -1), np.take_along_axis(np.asarray(weights), order, -1)


def test_masked_groups_are_filled_with_minus_inf():
  # Groups {0,1} and {2,3} win, but only experts 0 and 2 stay positive after the bias: the third pick is expert 3
  # under -inf (transformers 5.24, DeepSeek's gate) and a 0.0 of a dropped group under transformers 4.x's rule.
  scores = np.array([[0.9, 0.2, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1]], np.float32)
  bias = np.array([0.0, -0.5, 0.0, -0.2, -0.2, -0.2, -0.2, -0.2], np.float32)
  assert list(transformers_topk(scores, bias, CFG, -np.inf)[0]) == [0, 2, 3]
  assert transformers_topk(scores, bias, CFG, 0.0)[0].max() >= 4  # the case tells the rules apart
  idx, weights = sorted_route(scores, bias, CFG)
  assert idx.tolist() == [[0, 2, 3]]
  # Weights are the chosen unbiased scores, normalised, times the scaling factor.
  chosen = scores[:, [0, 2, 3]]
  np.testing.assert_allclose(weights, chosen / chosen.sum(-1, keepdims=True) * 2.5, rtol=1e-6)


def test_group_routing_matches_transformers_fixture():
  ref = np.load(ROUTER_GROUPS)
  idx, weights = sorted_route(ref["scores"], ref["bias"], CFG16)
  np.testing.assert_array_equal(idx, ref["idx"])
  np.testing.assert_allclose(weights, ref["weights"], rtol=1e-6)
  for fill in (0.0, -np.inf):  # drawn so that the fill cannot matter: both rules give transformers' sets
    np.testing.assert_array_equal(transformers_topk(ref["scores"], ref["bias"], CFG16, fill), ref["idx"])


def test_transformers_5_24_fills_masked_groups_with_minus_inf():
  # The fill case run through transformers' own router: the transcription's -inf rule is what it does.
  ref = np.load(ROUTER_GROUPS)
  assert ref["fill_idx"].tolist() == [[0, 2, 3]]
  np.testing.assert_array_equal(transformers_topk(ref["fill_scores"], ref["fill_bias"], CFG, -np.inf), ref["fill_idx"])
  assert transformers_topk(ref["fill_scores"], ref["fill_bias"], CFG, 0.0).tolist() != [[0, 2, 3]]


def test_fill_case_matches_transformers_5_24():
  ref = np.load(ROUTER_GROUPS)
  idx, weights = sorted_route(ref["fill_scores"], ref["fill_bias"], CFG)
  np.testing.assert_array_equal(idx, ref["fill_idx"])
  np.testing.assert_allclose(weights, ref["fill_weights"], rtol=1e-6)
