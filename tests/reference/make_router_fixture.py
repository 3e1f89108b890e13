"""Make tests/reference/data/router_groups.npz: group-limited routing (n_group > 1) from transformers' DeepseekV3.

Regenerate (from the repo root, CPU, no network, ~5 s; never imported by kimi_jax or its tests):
  /work/refenv/bin/python tests/reference/make_router_fixture.py

What transformers 5.24 computes: `DeepseekV3TopkRouter.forward(hidden_states)` (the `gate` of `DeepseekV3MoE`,
which only calls it) returns (router_logits, topk_weights, topk_indices):
  logits = F.linear(x.float(), W.float()); s = sigmoid(logits); c = s + e_score_correction_bias;
  group score = sum of each group's best two c; keep the topk_group best groups (topk, sorted=False);
  c.masked_fill(~score_mask.bool(), float("-inf")) on the dropped groups; topk(c, K, sorted=False) -> indices;
  weights = s gathered, / (sum + 1e-20) if norm_topk_prob, x routed_scaling_factor.
Masked groups get **-inf** in 5.24 (transformers 4.x's `get_topk_indices` used 0.0, DeepSeek's own gate -inf). The
two fills differ only when fewer than K experts of the kept groups have c > 0: then 0.0 lets a dropped group's expert
in. The random case is therefore drawn so that every token has at least K kept experts with c > 0 (asserted: its
answer does not depend on the fill), and a separate hand-made case ("fill_*", 8 experts, K = 3) is one where the
fills disagree, recorded with what transformers picks.

Keys (T = 64 tokens, E = 16 experts in 4 groups of 4, keep 2 groups, K = 4, routed_scaling_factor 2.5, hidden 32;
gate weight with logit std ~3, bias ~ N(0, 0.3^2), float32):
  scores f32 [T, E] = transformers' sigmoid(router_logits); bias f32 [E]; idx int32 [T, K] sorted ascending per
  row; weights f32 [T, K] aligned with idx (transformers' topk(sorted=False) order is discarded); seed int32 [];
  fill_scores f32 [1, 8], fill_bias f32 [8], fill_idx int32 [1, 3], fill_weights f32 [1, 3]: the fill case.
"""

import pathlib

import numpy as np
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

OUT = pathlib.Path(__file__).parent / "data" / "router_groups.npz"
TOKENS, HIDDEN, BIAS_STD = 64, 32, 0.3
LOGIT_STD = 3.0  # spreads the scores enough that the bias alone does not fix most tokens' choice
ROUTER = dict(
  n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5
)


def make_router(hidden: int, weight: np.ndarray, bias: np.ndarray, **kw) -> DeepseekV3TopkRouter:
  cfg = DeepseekV3Config(hidden_size=hidden, **kw)
  router = DeepseekV3TopkRouter(cfg).eval()
  with torch.no_grad():
    router.weight.copy_(torch.from_numpy(weight))
    router.e_score_correction_bias.copy_(torch.from_numpy(bias))
  return router


@torch.no_grad()
def run(router: DeepseekV3TopkRouter, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """-> scores [T, E], idx [T, K] sorted ascending per row, weights [T, K] aligned with idx."""
  logits, weights, idx = router(torch.from_numpy(x))
  scores, weights, idx = logits.sigmoid().numpy(), weights.numpy(), idx.numpy()
  order = np.argsort(idx, axis=-1)
  return scores, np.take_along_axis(idx, order, -1).astype(np.int32), np.take_along_axis(weights, order, -1)


def groups_kept(choice: np.ndarray, n_group: int, topk_group: int) -> np.ndarray:
  """[T, E] bool: the experts of each token's topk_group best groups (group score = sum of its best two)."""
  t, e = choice.shape
  group_score = np.sort(choice.reshape(t, n_group, e // n_group), -1)[..., -2:].sum(-1)
  order = np.sort(group_score, -1)[:, ::-1]
  assert np.all(order[:, topk_group - 1] > order[:, topk_group]), "tie at the group boundary"
  kept = group_score >= order[:, topk_group - 1 : topk_group]
  return np.repeat(kept, e // n_group, axis=-1)


def random_case(seed: int) -> dict[str, np.ndarray] | None:
  """The random case for `seed`, or None if its answer would depend on the fill value (or has a tie)."""
  rng = np.random.default_rng(seed)
  e, k = ROUTER["n_routed_experts"], ROUTER["num_experts_per_tok"]
  weight = (rng.standard_normal((e, HIDDEN)) * LOGIT_STD / np.sqrt(HIDDEN)).astype(np.float32)
  bias = rng.normal(0, BIAS_STD, e).astype(np.float32)
  x = rng.standard_normal((TOKENS, HIDDEN)).astype(np.float32)
  scores, idx, weights = run(make_router(HIDDEN, weight, bias, **ROUTER), x)
  choice = scores + bias
  kept = groups_kept(choice, ROUTER["n_group"], ROUTER["topk_group"])
  best = np.sort(np.where(kept, choice, -np.inf), -1)[:, ::-1]
  if not np.all(best[:, k - 1] > 0):  # the K-th kept expert must beat a 0.0 fill: then 0.0 and -inf agree
    return None
  assert np.all(best[:, k - 1] > best[:, k]), "tie at the top-K boundary"
  assert np.all(np.take_along_axis(kept, idx, -1)), "transformers picked an expert of a dropped group"
  want = np.sort(np.argsort(-np.where(kept, choice, -np.inf), -1, kind="stable")[:, :k], -1)
  np.testing.assert_array_equal(idx, want)
  chosen = np.take_along_axis(scores, idx, -1)
  np.testing.assert_allclose(
    weights, chosen / chosen.sum(-1, keepdims=True) * ROUTER["routed_scaling_factor"], rtol=1e-6
  )
  # The case must exercise both the bias and the group limit.
  plain = np.sort(np.argsort(-scores, -1, kind="stable")[:, :k], -1)
  ungrouped = np.sort(np.argsort(-choice, -1, kind="stable")[:, :k], -1)
  by_bias = np.mean(np.any(plain != ungrouped, -1))
  by_groups = np.mean(np.any(ungrouped != idx, -1))
  n_sets = len({tuple(r) for r in idx.tolist()})
  n_group_sets = len({tuple(sorted(set(r))) for r in (idx // (e // ROUTER["n_group"])).tolist()})
  assert by_bias > 0.3 and by_groups > 0.3 and n_sets >= 24 and n_group_sets >= 5, (by_bias, by_groups, n_sets)
  margin = best[:, k - 1].min()
  print(
    f"seed {seed}: bias changes {by_bias:.0%} of the sets, the group limit {by_groups:.0%}; {n_sets} distinct "
    f"sets over {n_group_sets} group sets; smallest K-th kept s + b = {margin:.4f}"
  )
  return dict(scores=scores, bias=bias, idx=idx, weights=weights, seed=np.int32(seed))


def fill_case() -> dict[str, np.ndarray]:
  """8 experts, K = 3: groups {0,1} and {2,3} win, but only experts 0 and 2 keep s + b > 0 there."""
  want = np.array([0.9, 0.2, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1], np.float32)
  bias = np.array([0.0, -0.5, 0.0, -0.2, -0.2, -0.2, -0.2, -0.2], np.float32)
  weight = np.diag(np.log(want / (1 - want))).astype(np.float32)  # x = ones: logits = logit(want)
  router = make_router(
    8,
    weight,
    bias,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
  )
  scores, idx, weights = run(router, np.ones((1, 8), np.float32))
  np.testing.assert_allclose(scores, want[None], rtol=1e-6)
  # -inf fill: the third pick is expert 3 of a kept group (a 0.0 fill would pick a 0.0 of experts 4-7).
  assert idx.tolist() == [[0, 2, 3]], idx
  return dict(fill_scores=scores, fill_bias=bias, fill_idx=idx, fill_weights=weights)


def main():
  torch.manual_seed(0)
  torch.set_num_threads(1)
  for seed in range(100):
    case = random_case(seed)
    if case is not None:
      break
    print(f"seed {seed}: some token's answer depends on the fill value, next seed")
  else:
    raise SystemExit("no seed in 0..99 gives a fill-independent case")
  data = {**case, **fill_case()}
  OUT.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(OUT, **data)
  print(f"{OUT}: {OUT.stat().st_size:,} bytes")


if __name__ == "__main__":
  main()
