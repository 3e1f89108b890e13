"""The optimizer update of a run config, compiled for a TPU slice on this host: per-chip cost of AdamW, MuonClip
with XLA's own Newton–Schulz layout, MuonClip with Newton–Schulz spread over the mesh (whole matrices per chip,
kimi_jax/optim/ns_sharding.py), and the same with the fused Pallas Newton–Schulz kernel (all five steps in VMEM,
pallas_kernels/matrix_iteration; matrices over its VMEM budget stay on the XLA loop).

  .venv/bin/python benchmarks/optimizer_pod.py [--config configs/kimi_k2.py] [--topology v5p:8x8x8]
  .venv/bin/python benchmarks/optimizer_pod.py --config configs/proxy.py --topology v5p:1x1x1

Compiles `apply_updates(params, tx.update(grads, ...))` with the run's param and optimizer-state shardings
(libtpu, nothing runs; ~1 minute per row on 2 CPU cores for full K2) and prints XLA's per-chip counts: FLOPs,
HBM bytes accessed, bytes moved by collectives, temporaries, and the roofline time max(FLOPs / peak,
bytes / HBM bandwidth) — a lower bound that ignores the collectives — and its ratio to AdamW's. The Pallas
kernel's FLOPs and bytes are its own declared cost estimate (one read and one write of each matrix).
"""

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import optax

from kimi_jax import sharding
from kimi_jax.backend import target_platform
from kimi_jax.chips import HBM_BYTES_PER_S, PEAK_FLOPS
from kimi_jax.model import LAYER_GROUPS
from kimi_jax.tools.aot import abstract_training, topology_devices
from kimi_jax.tools.hlo import hlo_stats
from kimi_jax.train_config import load_run_config


@dataclasses.dataclass
class Row:
  label: str
  flops: float
  hbm_bytes: float
  collectives: dict
  temp_bytes: int
  compile_s: float


def compile_update(c, devices, label) -> Row:
  training = abstract_training(c, devices)
  mesh, cfg, tx, params, opt_state = (
    training.mesh,
    training.cfg,
    training.tx,
    training.state.params,
    training.state.opt_state,
  )
  shardings = training.state.shardings()
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  layers = {"dense_layers": cfg.first_k_dense_replace, "moe_layers": cfg.num_hidden_layers - cfg.first_k_dense_replace}
  max_logits = {
    g: jax.ShapeDtypeStruct((layers[g], cfg.num_attention_heads), jnp.float32, sharding=replicated)
    for g in LAYER_GROUPS
    if layers[g]
  }

  def update(grads, opt_state, params, max_logits):
    updates, opt_state = tx.update(grads, opt_state, params, max_logits=max_logits)
    return optax.apply_updates(params, updates), opt_state

  step = jax.jit(update, out_shardings=(shardings.params, shardings.opt_state), donate_argnums=(1, 2))
  t0 = time.perf_counter()
  with target_platform("tpu"), sharding.use_mesh(mesh):
    compiled = step.lower(params, opt_state, params, max_logits).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return Row(
    label,
    float(cost.get("flops", 0.0)),
    float(cost.get("bytes accessed", 0.0)),
    hlo_stats(compiled.as_text(), len(mesh.devices.flat))["collective_bytes"],
    compiled.memory_analysis().temp_size_in_bytes,
    time.perf_counter() - t0,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/kimi_k2.py")
  parser.add_argument("--topology", default="v5p:8x8x8")
  args = parser.parse_args()

  c = load_run_config(args.config)
  devices = topology_devices(args.topology)
  chip = args.topology.split(":")[0]
  peak, bandwidth = PEAK_FLOPS[chip], HBM_BYTES_PER_S[chip]
  rows = []
  for label, optimizer, spread, impl in (
    ("adamw", "adamw", False, "xla"),
    ("muon_clip, XLA layout", "muon_clip", False, "xla"),
    ("muon_clip, spread", "muon_clip", True, "xla"),
    ("muon_clip, spread+Pallas", "muon_clip", True, "pallas"),
  ):
    c.optimizer, c.spread_newton_schulz, c.muon_ns_impl = optimizer, spread, impl
    rows.append(compile_update(c, devices, label))

  gib = 1 << 30
  print(
    f"{os.path.basename(args.config)} on {args.topology} ({len(devices)} chips, mesh {c.mesh}); per chip, "
    f"from XLA's cost analysis of the compiled update"
  )
  print(
    f"{'optimizer':25} {'TFLOP':>8} {'HBM GiB':>8} {'all-reduce':>10} {'all-gather':>10} {'all-to-all':>10} "
    f"{'temp GiB':>8} {'roofline ms':>11} {'× adamw':>7} {'compile s':>9}"
  )
  roofline = lambda r: max(r.flops / peak, r.hbm_bytes / bandwidth) * 1e3
  for r in rows:
    coll = r.collectives
    print(
      f"{r.label:25} {r.flops / 1e12:8.2f} {r.hbm_bytes / gib:8.1f} {coll['all-reduce'] / gib:10.1f} "
      f"{coll['all-gather'] / gib:10.1f} {coll['all-to-all'] / gib:10.1f} {r.temp_bytes / gib:8.1f} "
      f"{roofline(r):11.2f} {roofline(r) / roofline(rows[0]):7.2f} {r.compile_s:9.0f}"
    )
  print(
    "collectives: GiB of results per chip; roofline: max(FLOPs / peak, HBM bytes / bandwidth), collectives not included"
  )


if __name__ == "__main__":
  main()
