"""Run by tests/sharding/test_sharding.py in a subprocess with 8 fake CPU devices; prints one JSON line of results.

For each mesh: max |logits − single-device logits| and max |grad − single-device grad| over all params, for a
float32 tiny model, plus the same for a 2-microbatch train step against a 1-microbatch one.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kimi_jax import config, sharding  # noqa: E402
from kimi_jax.data.batch import Batch  # noqa: E402
from kimi_jax.model import KimiK2  # noqa: E402
from kimi_jax.model_stats import abstract_model  # noqa: E402
from kimi_jax.train_config import base_config, model_config  # noqa: E402
from kimi_jax.training.optimizer import build_optimizer  # noqa: E402
from kimi_jax.training.state import init_train_state, param_shardings  # noqa: E402
from kimi_jax.training.step import cross_entropy, make_train_step  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
MESHES = ("fsdp=2,expert=4", "data=2,expert=2,tensor=2", "expert=8")
SMALL = dict(hidden_size=64, num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32)  # fast compiles


def main():
  cfg = config.tiny(dtype="float32").replace(**SMALL)
  graphdef, params, rest = nnx.split(KimiK2(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  params, rest = params.to_pure_dict(), rest.to_pure_dict()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (8, 32), dtype=np.int32)
  targets = rng.integers(0, cfg.vocab_size, (8, 32), dtype=np.int32)
  segments = np.repeat(np.array([[1] * 20 + [2] * 10 + [0] * 2]), 8, axis=0).astype(np.int32)

  def loss(params, rest, tokens):
    logits, _ = nnx.merge(graphdef, nnx.State(params), nnx.State(rest))(tokens, segment_ids=segments)
    nll, count = cross_entropy(logits, targets, (segments != 0).astype(jnp.float32))
    return nll / count, logits

  (ref_loss, ref_logits), ref_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, rest, tokens)
  abstract = nnx.state(abstract_model(cfg), nnx.Param, ...)

  results = {}
  for spec in MESHES:
    mesh = sharding.make_mesh(spec)
    p = jax.device_put(params, sharding.state_shardings(abstract[0], mesh))
    r = jax.device_put(rest, sharding.state_shardings(abstract[1], mesh))
    t = jax.device_put(tokens, sharding.batch_sharding(mesh))
    with sharding.use_mesh(mesh):
      (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(p, r, t)
    results[spec] = {
      "logits": float(jnp.max(jnp.abs(logits - ref_logits))),
      "loss": float(abs(value - ref_loss)),
      "grads": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))),
      "expert_spec": str(p["moe_layers"]["mlp"]["experts"]["gate"].sharding.spec),
    }
  results["microbatches"] = microbatch_check()
  results["spread_ns"] = spread_ns_check()
  print(json.dumps(results))


def one_train_step(mesh_spec: str, **train):
  """(params before, params after, loss) of one MuonClip step (float32 Newton–Schulz, so that layouts can be
  compared tightly) of the small model on `mesh_spec` ("" = one device). No warm-up: the step moves every param."""
  c = base_config("tiny")
  c.model.update(dtype="float32", **SMALL)
  c.update(
    batch_size=8, seq_len=16, mesh=mesh_spec, optimizer="muon_clip", warmup_steps=0, muon_ns_dtype="float32", **train
  )
  cfg = model_config(c)
  mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1] if mesh_spec == "" else None)
  tx = build_optimizer(c, cfg, param_shardings(cfg, mesh))
  graphdef, state = init_train_state(c, cfg, tx, mesh)
  step = make_train_step(graphdef, tx, c, state.shardings())
  rng = np.random.default_rng(1)
  batch = Batch.unpacked(rng.integers(0, 259, (8, 16)), rng.integers(0, 259, (8, 16)))
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  start = jax.device_get(state.params)
  with sharding.use_mesh(mesh):
    state, metrics = step(state, batch)
  return start, jax.device_get(state.params), float(metrics["loss"])


def max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def spread_ns_check():
  """MuonClip's Newton–Schulz spread over the mesh (whole matrices per device; also with the Pallas kernel, in
  interpret mode, under shard_map) against one device and against XLA's own layout: parameter differences after
  one step (and the step's size), and, for one stacked expert leaf, the all-reduces and per-device FLOPs of the
  compiled update."""
  start, one, _ = one_train_step("")
  out = {"step_size": max_diff(one, start)}
  for name, spread, impl in (("spread", True, "xla"), ("xla_layout", False, "xla"), ("spread_pallas", True, "pallas")):
    after = one_train_step("fsdp=2,expert=4", spread_newton_schulz=spread, muon_ns_impl=impl)[1]
    out[f"{name}_vs_one_device"] = max_diff(after, one)

  from kimi_jax.optim import muon_clip

  mesh = sharding.make_mesh("fsdp=2,expert=4")
  sh = {"w": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "expert", "fsdp", None))}
  w = {"w": jax.ShapeDtypeStruct((4, 8, 64, 32), jnp.float32, sharding=sh["w"])}
  for name, spread in (("spread", True), ("xla_layout", False)):
    tx = muon_clip(1e-3, muon_dims={"w": (-2, -1)}, param_shardings=sh if spread else None)
    state = jax.eval_shape(tx.init, w)
    compiled = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p)[0]).lower(w, state, w).compile()
    text = compiled.as_text()
    cost = compiled.cost_analysis()
    out[f"{name}_all_reduces"] = text.count(" all-reduce(") + text.count(" all-reduce-start(")
    out[f"{name}_flops"] = float((cost[0] if isinstance(cost, list) else cost)["flops"])
  tx = muon_clip(1e-3, muon_dims={"w": (-2, -1)}, param_shardings=sh, ns_impl="pallas", ns_interpret=True)
  jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p)[0])(w, jax.eval_shape(tx.init, w), w)
  out["spread_pallas_calls"] = str(jaxpr).count("pallas_call")  # the kernel really is in the update
  return out


def microbatch_check():
  """One train step with microbatches=2 against microbatches=1 on the expert=8 mesh (same data, same init)."""
  start, p1, l1 = one_train_step("expert=8", microbatches=1)
  _, p2, l2 = one_train_step("expert=8", microbatches=2)
  return {"loss": abs(l1 - l2), "params": max_diff(p1, p2), "step_size": max_diff(p1, start)}


if __name__ == "__main__":
  sys.exit(main())
