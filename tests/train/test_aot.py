"""kimi_jax.tools.aot: compiling the real train step for a TPU topology on this CPU host (libtpu)."""

import pytest

from kimi_jax.tools import aot, hlo
from kimi_jax.train_config import base_config


def test_collective_bytes_reads_result_shapes():
  text = """HloModule m

ENTRY %main (x: bf16[8,576,576], y: f32[8], c: f32[1,3], e: bf16[4,16]) -> f32[] {
  %a = (bf16[8,576,576]{2,1,0:T(8,128)}, f32[8]{0}) all-reduce(%x, %y), replica_groups={{0,1}}
  %b = f32[2,3]{1,0} all-gather(%c), dimensions={0}
  %d = bf16[4,16]{1,0} all-to-all(%e), dimensions={0}
  ROOT %f = f32[] add(%g, %h)
}
"""
  got = hlo.hlo_stats(text, num_devices=2)["collective_bytes"]
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
  # Dots XLA compiled plus what the Pallas kernels declare: at least half the model's 6·N·tokens (+ attention).
  compiled = report["hlo_dot_flops_per_chip"] + report["hlo_custom_call_flops_per_chip"]
  assert compiled * report["chips"] > 0.5 * report["flops_per_step"]


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


_LOOP_HLO = """
%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,16]{1,0} constant({...})
  %d = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ag = f32[16,16]{1,0} all-gather(%d), replica_groups=[2,2]<=[4], dimensions={0}
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%j, %d)
}

%cond (q: (s32[], f32[8,16])) -> pred[] {
  %q = (s32[], f32[8,16]{1,0}) parameter(0)
  %n = s32[] constant(7)
  %k = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%k, %n), direction=LT
}

ENTRY %main (a: f32[8,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %z = s32[] constant(0)
  %init = (s32[], f32[8,16]{1,0}) tuple(%z, %a)
  %loop = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_hlo_stats_weights_loop_bodies_by_trip_count():
  s = hlo.hlo_stats(_LOOP_HLO, num_devices=4)
  assert s["loops"] == [(7, "loop")] and s["unknown_trip_counts"] == 0
  assert s["dot_flops"] == 7 * 2 * 8 * 16 * 16
  assert s["collective_bytes"]["all-gather"] == 7 * 16 * 16 * 4
  assert s["collective_traffic_bytes"]["all-gather"] == 7 * 16 * 16 * 4 / 2  # groups of 2: half comes from the peer
  # the dot reads x and w and writes d, seven times
  assert s["hbm_bytes"] >= 7 * (2 * 8 * 16 * 4 + 16 * 16 * 4)


def test_hlo_stats_of_a_compiled_scan_counts_every_layer_and_the_remat():
  """A 5-layer scanned, checkpointed matmul compiled for v5p: XLA's own cost_analysis counts the loop body once;
  hlo_stats counts the forward, its recomputation and the two backward dots of every layer."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P
  import numpy as np

  layers, batch, width = 5, 256, 512
  mesh = Mesh(np.array(aot.topology_devices("v5p:2x2x1")), ("x",))

  def loss(w, x):
    h, _ = jax.lax.scan(jax.checkpoint(lambda h, wi: (jnp.tanh(h @ wi), None)), x, w)
    return jnp.sum(h)

  w = jax.ShapeDtypeStruct((layers, width, width), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "x", None)))
  x = jax.ShapeDtypeStruct((batch, width), jnp.bfloat16, sharding=NamedSharding(mesh, P("x", None)))
  s = hlo.hlo_stats(jax.jit(jax.grad(loss)).lower(w, x).compile().as_text(), 4)
  per_layer = 2 * (batch // 4) * width * width  # one matmul on one chip's quarter of the batch
  assert s["forward_dot_flops"] == layers * per_layer
  assert s["remat_dot_flops"] == layers * per_layer
  assert s["dot_flops"] == 4 * layers * per_layer
  assert sorted(t for t, _ in s["loops"]) == [layers, layers]
  assert s["collective_bytes"]["all-gather"] > 0


def test_group_size_reads_each_replica_group_form():
  assert hlo._group_size("replica_groups=mesh['fsdp'=8,'expert'=64] {'expert'}, dims", 512) == 64
  assert hlo._group_size("replica_groups=mesh['fsdp'=8,'expert'=64] {'fsdp','expert'}", 512) == 512
  assert hlo._group_size("replica_groups=[64,8]<=[512]", 512) == 8
  assert hlo._group_size("replica_groups={{0,1,2,3},{4,5,6,7}}", 8) == 4


def test_hlo_stats_counts_a_head_batched_projection_once_per_head():
  """MLA's per-head projections ('...d,hdk->...hk') compile for TPU to a convolution whose window mostly covers
  padding; only the pairs inside the input count (XLA's cost model does the same)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P
  import numpy as np

  mesh = Mesh(np.array(aot.topology_devices("v5p:2x2x1")), ("x",))
  b, s, d, h, k = 8, 512, 1024, 16, 128
  x = jax.ShapeDtypeStruct((b, s, d), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
  w = jax.ShapeDtypeStruct((h, d, k), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  f = jax.jit(lambda x, w: jnp.einsum("bsd,hdk->bshk", x, w))
  stats = hlo.hlo_stats(f.lower(x, w).compile().as_text(), 4)
  assert stats["dot_flops"] == 2 * (b // 4) * s * d * h * k
  assert stats["other_dot_flops"] == stats["dot_flops"]  # not under jax.grad: counted as outside differentiation
