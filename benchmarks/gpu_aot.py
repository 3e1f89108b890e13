"""Compile the GPU kernels for an H100 on this CPU host (no GPU) and report, per kernel, launch grid and shared memory.

Needs the CUDA plugin, kept out of the project's environment (one command; ~5 GB of NVIDIA wheels):

  python -m venv /work/gpu-venv && /work/gpu-venv/bin/pip install 'jax-cuda12-plugin[with-cuda]==0.12.0.1' \\
    && /work/main/.venv/bin/python -c 'import site; print(site.getsitepackages()[0])' \\
       > /work/gpu-venv/lib/python3.12/site-packages/zz_main_venv.pth

  /work/gpu-venv/bin/python benchmarks/gpu_aot.py [--json] [--spills-fail] [case ...]

How: `jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=<H100 spec>, topology="1x1x1")`
gives compile-only H100 devices (jax-ml/jax#33542); the Pallas Triton lowering reads the target GPU from an abstract
mesh with `platform="cuda"` (with "gpu" JAX cannot canonicalise the platform without a GPU backend: jax-ml/jax#23971).
XLA compiles the Triton kernels to sm_90a machine code with ptxas; its thunk dump (`--xla_dump_to`) records each
kernel's grid, threads and shared memory. Registers per kernel are not reported: XLA keeps the cubin inside the
executable and logs no ptxas summary; `--spills-fail` (`--xla_gpu_fail_ptx_compilation_on_register_spilling`) makes
a kernel that spills registers fail instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# K2 on an H100 (SXM, 80 GB); XLA's own spec (xla/backends/gpu/target_config/specs/h100_sxm.txtpb), the fields
# this plugin version parses.
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

KERNEL_NAMES = ("gmm_gpu", "tgmm_gpu", "flash_fwd_gpu", "flash_dq_gpu", "flash_dkv_gpu", "mla_decode_gpu")


def _cases(s):
  """name -> (function, abstract args) at K2 shapes: experts (8 of 384 local, 8k rows), MLA attention (8 of 64
  heads, 4k packed context), MLA decode (64 heads, 8k cache, batch 8)."""
  import jax
  import jax.numpy as jnp

  import pallas_kernels as pk

  bf = jnp.bfloat16

  def gmm(lhs, rhs, sizes, offset, dout):
    out, vjp = jax.vjp(lambda a, b: pk.gmm(a, b, sizes, impl="gpu", group_offset=offset), lhs, rhs)
    return (out, *vjp(dout))

  def flash(q, k, v, seg, dout):
    fn = lambda q, k, v: pk.flash_attention(q, k, v, segment_ids=seg, impl="gpu", return_max_logits=True)
    (out, mx), vjp = jax.vjp(fn, q, k, v)
    return (out, mx, *vjp((dout, jnp.zeros_like(mx))))

  def flash_fwd(q, k, v, seg):
    return pk.flash_attention(q, k, v, segment_ids=seg, impl="gpu", return_max_logits=True)

  m, k, n, g, gt = 8192, 7168, 2048, 8, 384
  b, t, h = 1, 4096, 8
  qkv = [s((b, t, h, 192), bf), s((b, t, h, 192), bf), s((b, t, h, 128), bf), s((b, t), jnp.int32)]
  return {
    "gmm": (gmm, [s((m, k), bf), s((g, k, n), bf), s((gt,), jnp.int32), s((), jnp.int32), s((m, n), bf)]),
    "flash_attention_fwd": (flash_fwd, qkv),
    "flash_attention": (flash, [*qkv, s((b, t, h, 128), bf)]),
    "mla_decode": (
      lambda *a: pk.mla_decode(*a, 0.13, impl="gpu"),
      [s((8, 64, 512), bf), s((8, 64, 64), bf), s((8, 8192, 512), bf), s((8, 8192, 64), bf), s((8,), jnp.int32)],
    ),
  }


def _thunk_kernels(dump_dir: str, module: str) -> list[dict]:
  """Our Pallas kernels in XLA's thunk dump of `module`: name, grid, threads, shared memory (bytes)."""
  out = []
  for name in sorted(os.listdir(dump_dir)):
    if f".jit_{module}." in name and name.endswith("thunk_sequence.txt"):
      with open(os.path.join(dump_dir, name)) as f:
        for line in f:
          hit = re.search(
            r"kCustomKernel\s*\[[^]]*\]\s*(\S+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+"
            r"shared_memory: (\d+) bytes",
            line,
          )
          if hit and hit.group(1).rstrip("_0123456789").startswith(KERNEL_NAMES):
            out.append(
              {
                "kernel": hit.group(1),
                "grid": [int(x) for x in hit.group(2).split(",")],
                "threads": [int(x) for x in hit.group(3).split(",")],
                "shared_memory_bytes": int(hit.group(4)),
              }
            )
  return out


def compile_kernels(names=None) -> list[dict]:
  """Compiles each case for one H100; returns a row per case: ok, error, seconds, kernels (from the thunk dump)."""
  import jax
  from jax.experimental import topologies

  device = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET_CONFIG, topology="1x1x1").devices[0]
  single = jax.sharding.SingleDeviceSharding(device)
  abstract = jax.sharding.AbstractDevice(device_kind=device.device_kind, num_cores=None, platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=abstract)
  cases = _cases(lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=single))
  dump_dir = _dump_dir()
  rows = []
  for name, (f, args) in cases.items():
    if names and name not in names:
      continue
    f.__name__ = name  # names the dumped module: jit_<name>
    start = time.perf_counter()
    row = {"case": name, "device_kind": device.device_kind}
    try:
      with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(f).trace(*args).lower()
      compiled = lowered.compile()
      row.update(ok=True, temp_bytes=compiled.memory_analysis().temp_size_in_bytes)
    except Exception as e:  # noqa: BLE001 - the report says which case failed and why
      row.update(ok=False, error=str(e).splitlines()[0][:500])
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["kernels"] = _thunk_kernels(dump_dir, name) if dump_dir else []
    rows.append(row)
  return rows


def _dump_dir() -> str | None:
  hit = re.search(r"--xla_dump_to=(\S+)", os.environ.get("XLA_FLAGS", ""))
  return hit.group(1) if hit else None


CASES = ("gmm", "flash_attention_fwd", "flash_attention", "mla_decode")


def run_case(case: str, spills_fail: bool = False) -> dict:
  """Compiles one case in a fresh process (XLA reads its flags, and dumps a module, once per process)."""
  dump = tempfile.mkdtemp(prefix="gpu_aot_")
  flags = [f"--xla_dump_to={dump}"]
  if spills_fail:
    flags.append("--xla_gpu_fail_ptx_compilation_on_register_spilling=true")
  env = {**os.environ, "XLA_FLAGS": " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip(), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, os.path.abspath(__file__), "--child", case], env=env, capture_output=True, text=True, check=False
  )
  if proc.returncode != 0:
    return {"case": case, "ok": False, "error": proc.stderr.strip().splitlines()[-1:], "kernels": [], "seconds": 0}
  return json.loads(proc.stdout.strip().splitlines()[-1])[0]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("cases", nargs="*", help=f"subset of {CASES}")
  p.add_argument("--json", action="store_true", help="one JSON list on stdout")
  p.add_argument("--spills-fail", action="store_true", help="a kernel that spills registers fails to compile")
  p.add_argument("--child", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps(compile_kernels([args.child])))
    return 0
  rows = [run_case(case, args.spills_fail) for case in (args.cases or CASES)]
  if args.json:
    print(json.dumps(rows))
    return 0
  limit = H100_SHARED_MEMORY_PER_BLOCK_OPTIN
  print(f"{'case':22} {'ok':4} {'s':>6}  kernel: grid / threads / shared memory (limit {limit} B)")
  for r in rows:
    print(f"{r['case']:22} {'yes' if r['ok'] else 'NO':4} {r['seconds']:6.1f}  {r.get('error', '')}")
    for k in r["kernels"]:
      print(f"{'':35}{k['kernel']}: {k['grid']} / {k['threads'][0]} / {k['shared_memory_bytes']} B")
  return 0


if __name__ == "__main__":
  sys.exit(main())
