"""Compile the GPU kernels, and the train step, for H100s on this CPU host (no GPU): per kernel, launch grid and shared
memory; per train step, memory per GPU and the compiled program's FLOPs, HBM bytes and collective bytes.

Needs the CUDA plugin, kept out of the project's environment (one command; ~5 GB of NVIDIA wheels):

  python -m venv /work/gpu-venv && /work/gpu-venv/bin/pip install 'jax-cuda12-plugin[with-cuda]==0.12.0.1' \\
    && /work/main/.venv/bin/python -c 'import site; print(site.getsitepackages()[0])' \\
       > /work/gpu-venv/lib/python3.12/site-packages/zz_main_venv.pth

  /work/gpu-venv/bin/python benchmarks/gpu_aot.py [--json] [--spills-fail] [case ...]
  /work/gpu-venv/bin/python benchmarks/gpu_aot.py --step proxy     # configs/proxy.py on 8 H100s, both kernel sets
  /work/gpu-venv/bin/python benchmarks/gpu_aot.py --step k2 [--set mesh=fsdp=8,expert=64] [--set microbatches=2]

`--step` compiles `kimi_jax.tools.aot.compile_train_step` for an "h100:<slices>x<hosts>x<GPUs per host>" topology
(kimi_jax/tools/gpu_target.py), once with our Pallas GPU kernels (moe_impl and attention_impl "pallas") and once with
`ragged_dot` / XLA attention ("ragged", "xla"), each in its own process, and prints them side by side: arguments,
temporaries and peak per GPU against 80 GiB (79.1 GiB usable), dot FLOPs XLA compiled (FLOPs inside the Triton
kernels are not counted: they declare none), HBM and collective bytes per GPU (`kimi_jax.tools.hlo.hlo_stats`).
XLA's `cost_analysis()` returns None for these compile-only devices; `memory_analysis()` works.

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo: kimi_jax, pallas_kernels

from kimi_jax.tools import gpu_target  # noqa: E402
from kimi_jax.tools.gpu_target import H100_SHARED_MEMORY_PER_BLOCK_OPTIN  # noqa: E402

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

  device = gpu_target.gpu_devices("h100", "1x1x1")[0]
  single = jax.sharding.SingleDeviceSharding(device)
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=gpu_target.abstract_device(device))
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


# --- The train step (`kimi_jax.tools.aot`) for H100 nodes: our Pallas GPU kernels next to ragged_dot / XLA attention --
# Kernels per row: moe_impl, attention_impl.
IMPLS = {"pallas": ("pallas", "pallas"), "xla": ("ragged", "xla")}
# Each step: run config, topology, [(row name, kernels, config overrides)].
STEPS = {
  "proxy": ("configs/proxy.py", "h100:1x1x8", [("pallas", "pallas", {}), ("xla", "xla", {})]),
  # Full K2 at 1,024 × 4,096 = 4.19 M tokens per step on 64 nodes of 8 H100s; the config's mesh (fsdp=8, expert=64).
  "k2": (
    "configs/kimi_k2.py",
    "h100:64x1x8",
    [
      ("pallas", "pallas", {"batch_size": 1024, "microbatches": 1}),
      ("xla", "xla", {"batch_size": 1024, "microbatches": 1}),
    ],
  ),
}
GIB = 1 << 30


def _set(c, key: str, value) -> None:
  """c.<key> = value for a dotted key ("model.param_dtype")."""
  *path, last = key.split(".")
  for part in path:
    c = c[part]
  c[last] = value


def _parse_overrides(items) -> dict:
  import ast

  out = {}
  for item in items or []:
    key, _, text = item.partition("=")
    try:
      out[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[key] = text
  return out


def triton_kernels(hlo_text: str) -> dict:
  """{kernel name: call sites} of the Triton custom calls (our Pallas GPU kernels) in a compiled module's text."""
  out: dict = {}
  for line in hlo_text.splitlines():
    if "__gpu$xla.gpu.triton" in line:
      hit = re.search(r'\bname = "(\w+)"', line)
      key = hit.group(1) if hit else "?"
      out[key] = out.get(key, 0) + 1
  return out


def compile_step(config: str, topology: str, kernels: str, overrides: dict, hlo_out: str | None = None) -> dict:
  """`kimi_jax.tools.aot.compile_train_step` of run config `config` (with `overrides`, dotted keys) for `topology`,
  the MoE and attention kernels of IMPLS[kernels]; the report plus the Triton kernels' call sites and seconds."""
  from kimi_jax.tools import aot
  from kimi_jax.train_config import load_run_config

  c = load_run_config(config)
  moe, attention = IMPLS[kernels]
  c.model.update(moe_impl=moe, attention_impl=attention)
  for key, value in overrides.items():
    _set(c, key, value)
  start = time.perf_counter()
  with tempfile.NamedTemporaryFile("r", suffix=".hlo") as hlo:
    report = aot.compile_train_step(c, topology, hlo_out=hlo_out or hlo.name)
    with open(hlo_out or hlo.name) as f:
      text = f.read()
  report["compile_seconds"] = round(time.perf_counter() - start, 1)
  report["triton_kernels"] = triton_kernels(text)
  report["device_memory_bytes"] = gpu_target.H100_DEVICE_MEMORY_BYTES
  report.update(moe_impl=moe, attention_impl=attention, overrides=overrides)
  return report


def run_step(config: str, topology: str, kernels: str, overrides: dict, hlo_out: str | None = None) -> dict:
  """`compile_step` in a fresh process (its memory goes back when it ends); a row with `error` if it failed."""
  spec = {"config": config, "topology": topology, "kernels": kernels, "overrides": overrides, "hlo_out": hlo_out}
  spec = json.dumps(spec)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  start = time.perf_counter()
  proc = subprocess.run(
    [sys.executable, os.path.abspath(__file__), "--step-child", spec], env=env, capture_output=True, text=True
  )
  if proc.returncode != 0:
    tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
    return {"topology": topology, "kernels": kernels, "overrides": overrides, "error": " | ".join(tail)[-1500:],
            "compile_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _step_table(rows: list[dict], names: list[str]) -> str:
  """Rows side by side, a column per compiled step."""
  hbm = 80 * GIB

  def gib(x):
    return f"{x / GIB:.2f}" if isinstance(x, (int, float)) else "-"

  def tera(x):
    return f"{x / 1e12:.3f}" if isinstance(x, (int, float)) else "-"

  def gb(x):
    return f"{x / 1e9:.3f}" if isinstance(x, (int, float)) else "-"

  lines = [
    ("kernels (moe / attention)", lambda r: f"{r.get('moe_impl', '?')} / {r.get('attention_impl', '?')}"),
    ("topology / GPUs", lambda r: f"{r.get('topology')} / {r.get('chips', '-')}"),
    ("mesh", lambda r: ",".join(f"{k}={v}" for k, v in r.get("mesh", {}).items() if v > 1) or "-"),
    ("tokens / step, microbatches", lambda r: f"{r.get('global_batch_tokens', '-'):,} / {r.get('microbatches', '-')}"),
    ("arguments GiB / GPU", lambda r: gib(r.get("argument_bytes_per_chip"))),
    ("temporaries GiB / GPU", lambda r: gib(r.get("temp_bytes_per_chip"))),
    ("outputs GiB / GPU", lambda r: gib(r.get("output_bytes_per_chip"))),
    ("peak GiB / GPU", lambda r: gib(r.get("peak_bytes_per_chip"))),
    ("fits 80 GiB (79.1 usable)", lambda r: "-" if "peak_bytes_per_chip" not in r else
      f"{'yes' if r['peak_bytes_per_chip'] <= hbm else 'NO'} / "
      f"{'yes' if r['peak_bytes_per_chip'] <= r['device_memory_bytes'] else 'NO'}"),
    ("model TFLOP / GPU (6N·tok+attn)", lambda r: tera(r["flops_per_step"] / r["chips"]) if "chips" in r else "-"),
    ("XLA dot TFLOP / GPU", lambda r: tera(r.get("hlo_dot_flops_per_chip"))),
    ("  of which forward", lambda r: tera(r.get("hlo_forward_dot_flops_per_chip"))),
    ("  of which remat", lambda r: tera(r.get("hlo_remat_dot_flops_per_chip"))),
    ("Triton kernel call sites", lambda r: f"{sum(r.get('triton_kernels', {}).values())}"),
    ("custom calls executed", lambda r: f"{sum(r.get('hlo_custom_calls', {}).values()):.0f}"),
    ("HBM GB / GPU (hlo_stats)", lambda r: gb(r.get("hlo_hbm_bytes_accessed_per_chip"))),
    *[(f"{kind} GB / GPU", lambda r, kind=kind: gb(r.get("hlo_collective_bytes_per_chip", {}).get(kind)))
      for kind in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
                   "collective-permute")],
    ("collective traffic GB / GPU", lambda r: gb(sum(r["hlo_collective_traffic_bytes_per_chip"].values()))
      if "hlo_collective_traffic_bytes_per_chip" in r else "-"),
    ("compile s", lambda r: f"{r.get('compile_seconds', '-')}"),
  ]  # fmt: skip
  width = max(24, *(len(n) for n in names))
  out = [f"{'':34}" + "".join(f"{n:>{width}}" for n in names)]
  for label, fn in lines:
    out.append(f"{label:34}" + "".join(f"{fn(r):>{width}}" for r in rows))
  for name, r in zip(names, rows):
    if r.get("overrides"):
      out.append(f"{name}: overrides " + ", ".join(f"{k}={v}" for k, v in r["overrides"].items()))
    if r.get("triton_kernels"):
      out.append(
        f"{name}: Triton kernels (call sites): " + ", ".join(f"{k} {v}" for k, v in r["triton_kernels"].items())
      )
    if "error" in r:
      out.append(f"{name}: ERROR {r['error']}")
  return "\n".join(out)


def steps(
  step: str, kernels: list[str] | None, overrides: dict, hlo_dir: str | None = None
) -> tuple[list[str], list[dict]]:
  """Compiles STEPS[step]'s rows (only `kernels` if given), each with `overrides` on top; (names, rows). With
  `hlo_dir`, each compiled module's text goes to <hlo_dir>/<step>_<row>.hlo."""
  config, topology, cases = STEPS[step]
  names, rows = [], []
  for name, impl, extra in cases:
    if kernels and impl not in kernels:
      continue
    names.append(name)
    hlo_out = os.path.join(os.path.abspath(hlo_dir), f"{step}_{name}.hlo") if hlo_dir else None
    rows.append(run_step(config, topology, impl, {**extra, **overrides}, hlo_out))
  return names, rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("cases", nargs="*", help=f"subset of {CASES}")
  p.add_argument("--json", action="store_true", help="one JSON list on stdout")
  p.add_argument("--spills-fail", action="store_true", help="a kernel that spills registers fails to compile")
  p.add_argument("--step", choices=sorted(STEPS), help="compile a train step instead of the kernels (table per GPU)")
  p.add_argument("--kernels", action="append", choices=sorted(IMPLS), help="--step: only these rows")
  p.add_argument(
    "--set",
    action="append",
    metavar="KEY=VALUE",
    help="--step: config override, e.g. mesh=expert=64,fsdp=8 or model.param_dtype=bfloat16 (repeatable)",
  )
  p.add_argument("--hlo-dir", help="--step: keep each compiled module's text here")
  p.add_argument("--child", help=argparse.SUPPRESS)
  p.add_argument("--step-child", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(compile_kernels([args.child])))
    return 0
  if args.step_child:
    spec = json.loads(args.step_child)
    print(json.dumps(compile_step(**spec)))
    return 0
  if args.step:
    names, rows = steps(args.step, args.kernels, _parse_overrides(args.set), args.hlo_dir)
    print(json.dumps(rows) if args.json else _step_table(rows, names))
    return 0 if all("error" not in r for r in rows) else 1
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
