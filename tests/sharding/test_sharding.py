"""Meshes, shardings and their errors. The multi-device checks run on 8 fake CPU devices in a subprocess."""

import json
import os
import subprocess
import sys

from flax import nnx
import pytest

from kimi_jax import config, sharding
from kimi_jax.model_stats import abstract_model


@pytest.fixture(scope="module")
def sharded_results():
  script = os.path.join(os.path.dirname(__file__), "_sharded_checks.py")
  out = subprocess.run([sys.executable, script], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("spec", ["fsdp=2,expert=4", "data=2,expert=2,tensor=2", "expert=8"])
def test_sharded_forward_and_gradients_equal_one_device(sharded_results, spec):
  r = sharded_results[spec]
  assert r["logits"] <= 1e-4 and r["loss"] <= 1e-5 and r["grads"] <= 1e-4, r
  assert "expert" in r["expert_spec"]  # the experts really are split


def test_microbatching_equals_one_batch(sharded_results):
  r = sharded_results["microbatches"]
  assert r["step_size"] > 1e-4, r  # the step moved the params, so equal params mean equal updates
  assert r["loss"] <= 1e-5 and r["params"] <= 1e-6, r


def test_spread_newton_schulz_equals_one_device(sharded_results):
  """MuonClip on fsdp=2,expert=4 with Newton–Schulz spread over the mesh (XLA loop, or the Pallas kernel under
  shard_map) lands where one device does (float32 NS), like XLA's own layout; the spread update of a stacked expert
  leaf has no all-reduce (whole matrices per device) and fewer FLOPs per device, while XLA's layout all-reduces a
  Gram matrix every step."""
  r = sharded_results["spread_ns"]
  assert r["step_size"] > 1e-4, r
  assert max(r["spread_vs_one_device"], r["xla_layout_vs_one_device"], r["spread_pallas_vs_one_device"]) <= 1e-5, r
  # XLA's own layout reduces across devices inside Newton–Schulz (4-5 times, Gram or plain form); spread never does.
  assert r["spread_all_reduces"] == 0 and r["xla_layout_all_reduces"] >= 4, r
  assert r["spread_flops"] < r["xla_layout_flops"], r
  assert r["spread_pallas_calls"] >= 1, r


def test_mesh_spec_parsing_and_errors():
  assert sharding.parse_mesh_spec("fsdp=2,expert=-1", 8) == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
  with pytest.raises(ValueError, match="has 6 devices but 8 are available"):
    sharding.parse_mesh_spec("fsdp=2,expert=3", 8)
  with pytest.raises(ValueError, match="unknown axis 'pipe'"):
    sharding.parse_mesh_spec("pipe=2", 2)


def test_indivisible_experts_and_batch_are_named():
  import jax
  from jax.sharding import Mesh
  import numpy as np

  devices = np.array(jax.devices() * 3)[:3].reshape(1, 1, 3, 1)  # 3 "devices" on the expert axis
  mesh = Mesh(devices, sharding.MESH_AXES)
  cfg = config.tiny().replace(hidden_size=96)  # D splits 3 ways; only the 8 experts do not
  abstract = nnx.state(abstract_model(cfg), nnx.Param)
  with pytest.raises(ValueError, match=r"\['moe_layers'\]\['mlp'\]\['experts'\]\['down'\].*8.*expert"):
    sharding.state_shardings(abstract, mesh)
  with pytest.raises(ValueError, match="batch size 4 is not divisible by the 3 batch shards"):
    sharding.check_batch(4, mesh)
