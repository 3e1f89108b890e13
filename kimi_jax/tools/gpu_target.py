"""Compile-only NVIDIA GPU targets: the `target_config` that `jax.experimental.topologies.get_topology_desc(
platform="cuda", ...)` takes to describe GPUs on a host without one (needs the CUDA plugin, jax-cuda12-plugin;
benchmarks/gpu_aot.py says how to install it beside the project).

Topologies are "<slices>x<hosts>x<devices per host>": "1x1x8" is one 8-GPU node, "64x1x8" 64 nodes (512 GPUs).
`kimi_jax.tools.aot` takes them as "h100:1x1x8". The Pallas Triton lowering reads the target GPU from the abstract
mesh. Under a mesh of these devices (`kimi_jax.tools.aot`) that is the mesh's own (platform "gpu", kind H100); a
kernel compiled alone, with no mesh, needs an abstract mesh whose device says platform "cuda" (with "gpu" JAX cannot
canonicalise the platform without a GPU backend: jax-ml/jax#23971), hence `abstract_device`.

Imports nothing from kimi_jax; jax only inside functions.
"""

from __future__ import annotations

# An H100 SXM (80 GB); XLA's own spec (xla/backends/gpu/target_config/specs/h100_sxm.txtpb), the fields this plugin
# version parses.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
H100_SHARED_MEMORY_PER_BLOCK_OPTIN = 232448
# What CUDA reports as an H100 80GB's memory (79.1 GiB), below the nominal 80 GiB of kimi_jax.chips.HBM_BYTES.
H100_DEVICE_MEMORY_BYTES = 84942979072

# Chip name (as in kimi_jax.chips) -> target config.
TARGET_CONFIGS = {"h100": H100_TARGET_CONFIG}


def have_cuda_plugin() -> bool:
  """Whether the CUDA plugin (the GPU compiler) is importable here."""
  import importlib.util

  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins namespace at all
    return False


def gpu_devices(chip: str, topology: str) -> list:
  """Compile-only devices of `topology` ("<slices>x<hosts>x<devices per host>") of `chip` GPUs (nothing runs)."""
  from jax.experimental import topologies

  if chip not in TARGET_CONFIGS:
    raise ValueError(f"unknown GPU {chip!r}; known: {sorted(TARGET_CONFIGS)}")
  return topologies.get_topology_desc(platform="cuda", target_config=TARGET_CONFIGS[chip], topology=topology).devices


def abstract_device(device):
  """The `jax.sharding.AbstractDevice` of a compile-only GPU `device` with platform "cuda" (see the module doc)."""
  import jax

  return jax.sharding.AbstractDevice(
    device_kind=device.device_kind, num_cores=getattr(device, "core_count", None), platform="cuda"
  )
