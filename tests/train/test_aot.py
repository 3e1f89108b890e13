"""kimi_jax.tools.aot: compiling the real train step for a TPU topology on this CPU host (libtpu)."""

import pytest

from kimi_jax.tools import aot
from kimi_jax.train_config import base_config


def test_collective_bytes_reads_result_shapes():
  text = """
  %a = (bf16[8,576,576]{2,1,0:T(8,128)}, f32[8]{0}) all-reduce(%x, %y), replica_groups={{0,1}}
  %b = f32[2,3]{1,0} all-gather(%c), dimensions={0}
  %d = bf16[4,16]{1,0} all-to-all(%e), dimensions={0}
  %f = f32[] add(%g, %h)
  """
  got = aot.collective_bytes(text)
  assert got["all-reduce"] == 8 * 576 * 576 * 2 + 8 * 4
  assert got["all-gather"] == 24 and got["all-to-all"] == 128 and got["reduce-scatter"] == 0


def _tiny_run(**overrides):
  c = base_config("tiny")
  c.model.update(moe_impl="auto", attention_impl="auto")  # the Pallas kernels, as on a real TPU
  c.update(batch_size=8, seq_len=64, mesh="fsdp=2,expert=2", optimizer="muon_clip")
  c.update(**overrides)
  return c


def test_train_step_compiles_for_v5p_and_reports_memory():
  report = aot.compile_train_step(_tiny_run(), "v5p:2x2x1")
  assert report["chips"] == 4 and report["mesh"]["expert"] == 2
  assert report["fits"] and 0 < report["peak_bytes_per_chip"] < report["hbm_bytes_per_chip"]
  assert report["compiled_flops_per_step"] > 0.5 * report["flops_per_step"]


def test_unknown_chip_is_named():
  with pytest.raises(ValueError, match="unknown chip 'v9'"):
    aot.topology_devices("v9:2x2")


def test_k2_params_are_sharded_on_the_production_mesh():
  """On configs/kimi_k2.py's mesh (v5p-512, fsdp=8 × expert=64), every K2 parameter of more than 64 M elements is
  split at least 8 ways, and the per-chip share of all params is under 1/400 of the model."""
  import math

  from flax import nnx
  import jax

  from kimi_jax import sharding
  from kimi_jax.model_stats import abstract_model
  from kimi_jax.train_config import load_run_config, model_config

  c = load_run_config("configs/kimi_k2.py")
  mesh = sharding.make_mesh(c.mesh, devices=aot.topology_devices("v5p:8x8x8"))
  cfg = model_config(c)
  params = nnx.state(abstract_model(cfg), nnx.Param)
  shardings = sharding.state_shardings(params, mesh)
  total = per_chip = 0
  for (path, leaf), sh in zip(
    jax.tree_util.tree_flatten_with_path(params.to_pure_dict())[0], jax.tree.leaves(shardings)
  ):
    size = math.prod(leaf.shape)
    ways = size // math.prod(sh.shard_shape(leaf.shape))
    total, per_chip = total + size, per_chip + size // ways
    assert size <= 64 << 20 or ways >= 8, (jax.tree_util.keystr(path), leaf.shape, sh.spec)
  assert per_chip < total / 400, (per_chip, total)


def _compiled_hlo_lines(c, topology: str, scope: str) -> list[str]:
  """Lines of the TPU-compiled train step's HLO whose ops come from the named scope `scope`."""
  from kimi_jax import sharding
  from kimi_jax.backend import target_platform

  training = aot.abstract_training(c, aot.topology_devices(topology))
  with target_platform("tpu"), sharding.use_mesh(training.mesh):
    text = training.train_step().lower(training.state, training.batch()).compile().as_text()
  return [line for line in text.splitlines() if f"/{scope}/" in line]


def test_router_and_combine_dots_are_true_float32_on_tpu():
  """The router logits (and any dot left in the expert combine) compile with HIGHEST operand precision for TPU,
  where the default is one bf16 pass: near-tied top-K choices would otherwise flip against transformers."""
  import jax

  c = _tiny_run(optimizer="adamw")
  c.model.update(num_hidden_layers=2, n_routed_experts=24)
  with jax.default_matmul_precision("default"):  # conftest.py makes every dot "highest" for the parity tests
    router = _compiled_hlo_lines(c, "v5p:2x2x1", "router_logits")
    combine = _compiled_hlo_lines(c, "v5p:2x2x1", "expert_combine")
  dots = lambda lines: [x for x in lines if " convolution(" in x or " dot(" in x]
  assert dots(router), "no router dot found in the compiled HLO"
  assert combine, "no expert combine found in the compiled HLO"
  for line in dots(router) + dots(combine):
    assert "operand_precision={highest,highest}" in line, line
