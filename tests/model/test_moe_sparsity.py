"""Compile-time proof of sparsity: the TPU-compiled MoE's FLOPs (XLA cost analysis) grow with top-k, not with
the expert count, for the ragged and Pallas paths; the dense reference grows with the expert count."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from kimi_jax.backend import target_platform
from kimi_jax.layers.experts import routed_experts

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
T, D, F, K = 1024, 512, 256, 8  # tokens, model, expert hidden, top-k


def compiled_flops(impl: str, num_experts: int) -> float:
  from jax.experimental import topologies

  device = topologies.get_topology_desc("v5p:2x2x1", "tpu").devices[0]
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.SingleDeviceSharding(device))
  args = (
    spec((T, D), jnp.bfloat16),
    spec((T, K), jnp.int32),
    spec((T, K), jnp.float32),
    spec((num_experts, D, F), jnp.bfloat16),
    spec((num_experts, D, F), jnp.bfloat16),
    spec((num_experts, F, D), jnp.bfloat16),
  )
  with target_platform("tpu"), jax.default_matmul_precision("default"):  # bf16 TPU matmuls need DEFAULT
    compiled = jax.jit(lambda *a: routed_experts(*a, impl=impl)[0]).trace(*args).lower().compile()
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed: no TPU compiler")
@pytest.mark.parametrize("impl", ["ragged", "pallas"])
def test_expert_flops_do_not_grow_with_expert_count(impl):
  sparse = 2 * 3 * T * K * D * F  # gate, up, down for each (token, chosen expert) pair
  small, large = compiled_flops(impl, 16), compiled_flops(impl, 128)
  assert large <= 1.2 * small, (small, large)
  assert sparse <= small <= 1.2 * sparse, (small, sparse)
  dense_small, dense_large = compiled_flops("dense", 16), compiled_flops("dense", 128)
  assert dense_large >= 6 * dense_small  # the reference computes every expert
