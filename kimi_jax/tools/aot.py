"""Compile the real training step for a TPU or GPU topology on this (CPU) host and report whether it fits.

    python -m kimi_jax.tools.aot --config configs/kimi_k2.py --topology v5p:8x8x8 [--json] [--config.X=...]
    python -m kimi_jax.tools.aot --config configs/proxy.py --topology h100:1x1x8    # needs the CUDA plugin

Builds the abstract model, optimizer state and batch with their shardings over a mesh of the topology's chips
(nothing is allocated), lowers and compiles `train.make_train_step` with libtpu (TPU) or the CUDA plugin's
compile-only GPUs (`kimi_jax.tools.gpu_target`; topologies "h100:<slices>x<hosts>x<GPUs per host>"), and reports
per-chip bytes (arguments, temporaries, peak), FLOPs per step and the step time at a stated MFU, and the compiled
program's dot FLOPs, HBM bytes and collective bytes per chip (`kimi_jax.tools.hlo.hlo_stats`; `--hlo_out` keeps its
text). `benchmarks/aot_vs_maxtext.py` turns those into a roofline step time next to MaxText's; `benchmarks/gpu_aot.py
--step proxy|k2` compares the GPU kernels with the XLA paths.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import dataclasses
import json
import os
import re

from absl import app, flags
from flax import nnx
import jax
import ml_collections
import optax

from kimi_jax import cli_flags, sharding  # noqa: F401 (cli_flags: the shared --config and --json)
from kimi_jax.backend import target_platform
from kimi_jax.chips import HBM_BYTES, PEAK_FLOPS
from kimi_jax.config import ModelConfig
from kimi_jax.data.batch import Batch
from kimi_jax.model_stats import count_params, train_flops_per_step
from kimi_jax.tools import gpu_target
from kimi_jax.tools.hlo import hlo_stats
from kimi_jax.train_config import model_config
from kimi_jax.training.optimizer import build_optimizer
from kimi_jax.training.state import TrainState, abstract_train_state, model_shapes
from kimi_jax.training.step import make_train_step

# Flags (`python -m kimi_jax.tools.aot`); --config and --json are shared (kimi_jax/cli_flags.py).
flags.DEFINE_string(
  "topology", "v5p:8x8x8", "TPU or GPU topology, e.g. v5p:8x8x8 (512 chips), v6e:16x16, h100:64x1x8 (64 nodes of 8)."
)
flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the step-time estimate.")
flags.DEFINE_string("hlo_out", None, "Write the compiled (per-chip) HLO module's text to this file.")


def topology_devices(topology: str) -> list:
  """The devices of a topology described on this host (nothing runs): a TPU one such as 'v5p:8x8x8' (libtpu), or a
  GPU one such as 'h100:64x1x8', "<chip>:<slices>x<hosts>x<GPUs per host>" (the CUDA plugin's compile-only GPUs)."""
  from jax.experimental import topologies

  chip, _, shape = topology.partition(":")
  if chip not in HBM_BYTES:
    raise ValueError(f"unknown chip {chip!r} in topology {topology!r}; known: {sorted(HBM_BYTES)}")
  if chip in gpu_target.TARGET_CONFIGS:
    if not gpu_target.have_cuda_plugin():
      raise RuntimeError(f"topology {topology!r} needs the CUDA plugin (jax-cuda12-plugin); see benchmarks/gpu_aot.py")
    return gpu_target.gpu_devices(chip, shape)
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  return topologies.get_topology_desc(topology, "tpu").devices


@contextlib.contextmanager
def compiling_for(mesh: jax.sharding.Mesh) -> Iterator[None]:
  """Trace and lower for `mesh`'s devices: `target_platform` their platform (every `auto` and Pallas call resolves
  for them) and `mesh` current.

  Compile-only GPUs need nothing more: the Pallas Triton lowering reads the target GPU from the abstract mesh, and
  `mesh.abstract_mesh` carries their device kind (H100) and platform ("gpu"). An abstract mesh of platform "cuda"
  (what a kernel compiled alone, with no mesh, needs: `kimi_jax.tools.gpu_target.abstract_device`) must not be put
  over it: shard_map then refuses the concrete mesh ("The context mesh AbstractMesh(..., platform=cuda) should match
  the mesh passed to shard_map Mesh(...)").
  """
  with target_platform(mesh.devices.flat[0].platform), sharding.use_mesh(mesh):
    yield


@dataclasses.dataclass(frozen=True)
class AbstractTraining:
  """Run config `c`'s training over a topology's devices, from shapes alone (nothing is allocated)."""

  c: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  cfg: ModelConfig
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformationExtraArgs
  state: TrainState  # ShapeDtypeStructs carrying their NamedShardings on `mesh`

  def train_step(self):
    """`train.make_train_step` for this run, its state's layout pinned to `state`'s shardings."""
    return make_train_step(self.graphdef, self.tx, self.c, self.state.shardings())

  def batch(self) -> Batch:
    """The global batch [c.batch_size, c.seq_len] as ShapeDtypeStructs, split over the mesh."""
    return Batch.abstract(self.c.batch_size, self.c.seq_len, sharding.batch_sharding(self.mesh))


def abstract_training(c, devices) -> AbstractTraining:
  """Mesh, model config, optimizer and abstract train state of run config `c` over `devices`."""
  mesh = sharding.make_mesh(c.mesh, devices=devices)
  cfg = model_config(c)
  shapes = model_shapes(cfg, mesh)
  with target_platform(devices[0].platform):  # the optimizer picks its kernels for the target
    tx = build_optimizer(c, cfg, shapes.param_shardings)
  return AbstractTraining(c, mesh, cfg, shapes.graphdef, tx, abstract_train_state(shapes, tx, mesh))


def compile_train_step(c, topology: str, mfu: float = 0.4, hlo_out: str | None = None) -> dict:
  """Lower and compile the train step for `topology`; returns the report dict (and writes the compiled HLO text to
  `hlo_out` if given)."""
  devices = topology_devices(topology)
  chip = topology.split(":")[0]
  peak_flops, hbm = PEAK_FLOPS[chip], HBM_BYTES[chip]
  sharding.check_batch(c.batch_size, sharding.make_mesh(c.mesh, devices=devices))
  training = abstract_training(c, devices)
  mesh, cfg = training.mesh, training.cfg
  step = training.train_step()
  tokens = c.batch_size * c.seq_len
  model_flops = train_flops_per_step(cfg, c.batch_size, c.seq_len)
  report = {
    "topology": topology,
    "chips": len(devices),
    "mesh": dict(mesh.shape),
    "global_batch_tokens": tokens,
    "microbatches": c.microbatches,
    "total_params": count_params(cfg)["total_params"],
    "hbm_bytes_per_chip": hbm,
    "flops_per_step": model_flops,
  }
  with compiling_for(mesh):
    lowered = step.lower(training.state, training.batch())
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # libtpu refuses programs that cannot fit; report, don't crash
      needed = re.search(r"HLO temporaries \(([\d.]+)([GT])\)", str(e))
      if "CompileTimeHbmOom" not in str(e) or not needed:
        raise
      temp = float(needed.group(1)) * (1e9 if needed.group(2) == "G" else 1e12)
      return {**report, "temp_bytes_per_chip": int(temp), "fits": False, "error": "CompileTimeHbmOom"}
  memory = compiled.memory_analysis()
  text = compiled.as_text()
  if hlo_out:
    with open(hlo_out, "w") as f:
      f.write(text)
  stats = hlo_stats(text, len(devices))
  peak_bytes = (
    memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + memory.temp_size_in_bytes
  )
  return {
    **report,
    "argument_bytes_per_chip": memory.argument_size_in_bytes,
    "temp_bytes_per_chip": memory.temp_size_in_bytes,
    "output_bytes_per_chip": memory.output_size_in_bytes,
    "peak_bytes_per_chip": peak_bytes,
    "fits": peak_bytes <= hbm,
    # hlo_stats: loop bodies weighted by trip count; dots XLA compiled (not inside Pallas kernels).
    "hlo_dot_flops_per_chip": stats["dot_flops"],
    "hlo_remat_dot_flops_per_chip": stats["remat_dot_flops"],
    "hlo_forward_dot_flops_per_chip": stats["forward_dot_flops"],
    "hlo_custom_call_flops_per_chip": stats["custom_call_flops"],
    "hlo_hbm_bytes_accessed_per_chip": stats["hbm_bytes"],
    "hlo_collective_bytes_per_chip": stats["collective_bytes"],
    "hlo_collective_traffic_bytes_per_chip": stats["collective_traffic_bytes"],
    "hlo_custom_calls": stats["custom_calls"],
    "hlo_unknown_trip_counts": stats["unknown_trip_counts"],
    "mfu_assumed": mfu,
    "step_seconds_at_mfu": model_flops / (len(devices) * peak_flops * mfu),
  }


def main(argv):
  del argv
  f = flags.FLAGS
  if f.config is None:
    raise app.UsageError("give --config (e.g. configs/kimi_k2.py)")
  report = compile_train_step(f.config, f.topology, f.mfu, f.hlo_out)
  if f.json:
    print(json.dumps(report))
    return
  gib = 1 << 30
  for key, value in report.items():
    if key.endswith("bytes_per_chip") and isinstance(value, int):
      value = f"{value / gib:,.2f} GiB"
    elif isinstance(value, float):
      value = f"{value:,.4g}"
    print(f"{key:>26}  {value}")


if __name__ == "__main__":
  app.run(main)
