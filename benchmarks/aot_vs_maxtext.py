"""The full Kimi K2 train step, ours and MaxText's, compiled for the same TPU pod on this CPU host, side by side.

  .venv/bin/python benchmarks/aot_vs_maxtext.py                       # v5p:8x8x8 (512) and v5p:8x8x4 (256)
  .venv/bin/python benchmarks/aot_vs_maxtext.py --topologies v5p:8x8x8 --out /tmp/aotcmp

MaxText lives in its own venv, never a dependency of this project (one command, or `--install`):

  python3.12 -m venv /work/maxtext-venv && /work/maxtext-venv/bin/pip install "maxtext[tpu]==0.2.5" \\
      jax==0.12.0.1 jaxlib==0.12.0.1 libtpu==0.0.50.1      # the same jax and libtpu (XLA) as ours

Each program is compiled for the topology with libtpu (nothing runs), by its own CLI in its own process: ours
`python -m kimi_jax.tools.aot`, MaxText's `train_compile` (run through `--maxtext-worker`, which only captures the
compiled object to write its memory analysis and HLO text). Both HLO texts then go through the same analysis,
`kimi_jax.tools.hlo.hlo_stats` (loop bodies weighted by trip count; XLA's own cost_analysis counts each loop body
once). Per row, per chip and per step:

- peak memory (arguments + outputs - aliased + temporaries) and whether it fits 95 GiB of v5p HBM;
- compute FLOPs: model FLOPs (6 x active params x tokens + causal attention) times (3 + r) / 3, where r is the
  recomputed fraction of the forward measured in the HLO (dots under jax.checkpoint's rematted_computation over the
  forward's dots), plus the dots outside differentiation (the optimizer: Muon's Newton-Schulz). XLA counts no FLOPs
  inside Pallas kernels (the expert matmuls and attention of both programs), so the HLO's dot FLOPs are shown only
  as the part XLA sees;
- HBM bytes: operand + result bytes of every top-level op in the compiled HLO (fusions as one op, VMEM excluded);
- collective bytes by kind, and the ICI traffic each chip sends (ring factors, `hlo_stats`);
- a roofline step time: max(compute / peak FLOP/s, HBM bytes / HBM bandwidth, ICI traffic / ICI bandwidth), which
  assumes perfect overlap, and the MFU bound model FLOPs / (chips x peak x roofline time).

Chip peaks (v5p, both rows): 459 TFLOP/s bf16, 2.765 TB/s HBM, 95 GiB HBM; ICI: 4,800 Gbps per chip = 600 GB/s,
assumed all usable by one collective at a time (an optimistic bound for both programs alike).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MAXTEXT_VENV = os.environ.get("MAXTEXT_VENV", "/work/maxtext-venv")
MAXTEXT_PIN = ["maxtext[tpu]==0.2.5", "jax==0.12.0.1", "jaxlib==0.12.0.1", "libtpu==0.0.50.1"]
sys.path.insert(0, ROOT)  # also for the --maxtext-worker process, which runs in MaxText's venv
from kimi_jax.chips import HBM_BYTES, HBM_BYTES_PER_S  # noqa: E402 (imports nothing: safe in MaxText's venv)
from kimi_jax.chips import PEAK_FLOPS as _CHIP_PEAK_FLOPS  # noqa: E402

PEAK_FLOPS, HBM_BW, HBM = _CHIP_PEAK_FLOPS["v5p"], HBM_BYTES_PER_S["v5p"], HBM_BYTES["v5p"]  # both rows are v5p
ICI_BW = 600e9  # v5p ICI, 4,800 Gbps per chip, all of it assumed usable by one collective (optimistic for both)
SEQ = 4096
GLOBAL_BATCH = 1024  # sequences: 4.19 M tokens per step on both topologies
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all", "collective-permute")

# MaxText's flags for kimi-k2-1t with its published recipe: Muon + qk-clip (tokamax splash is required for the
# max-logit record), megablox grouped matmuls, sparse matmul expert dispatch, full remat.
MAXTEXT_BASE = [
  "model_name=kimi-k2-1t",
  "compile_topology_num_slices=1",
  f"max_target_length={SEQ}",
  "use_qk_clip=True",
  "use_tokamax_splash=True",
  "megablox=True",
  "sparse_matmul=True",
  "remat_policy=full",
  "dataset_type=synthetic",
  "enable_checkpointing=False",
  "run_name=aot_vs_maxtext",
  "base_output_directory=/tmp/maxtext_out",
]
# Per topology: ours (config overrides) and MaxText's variants, tried in order; the first that fits is the row
# compared (the published recipe first, then the smallest change to its own flags).
PLANS = {
  "v5p:8x8x8": {
    "topology": "v5p-1024",  # MaxText names v5p by TensorCores: 512 chips
    "ours": ["--config.batch_size=1024", "--config.microbatches=1"],
    "maxtext": [
      ("muon, fsdp 64 x expert 8", ["opt_type=muon", "per_device_batch_size=2", "ici_fsdp_parallelism=64",
                                    "ici_expert_parallelism=8"]),
      ("muon (maxtext_muon, all-to-all Newton-Schulz), fsdp 64 x expert 8", ["opt_type=muon", "muon_type=maxtext_muon",
        "muon_use_all_to_all=True", "per_device_batch_size=2", "ici_fsdp_parallelism=64", "ici_expert_parallelism=8"]),
      ("muon (maxtext_muon, all-to-all Newton-Schulz), fsdp 64 x expert 8, 2 grad-accum steps of per-device batch 1",
       ["opt_type=muon", "muon_type=maxtext_muon", "muon_use_all_to_all=True", "per_device_batch_size=1",
        "gradient_accumulation_steps=2", "ici_fsdp_parallelism=64", "ici_expert_parallelism=8"]),
      ("adamw, fsdp 64 x expert 8", ["opt_type=adamw", "per_device_batch_size=2", "ici_fsdp_parallelism=64",
                                     "ici_expert_parallelism=8"]),
    ],
  },
  "v5p:8x8x4": {
    "topology": "v5p-512",
    "ours": ["--config.batch_size=1024", "--config.microbatches=4", "--config.mesh=fsdp=4,expert=64",
             "--config.model.param_dtype=bfloat16"],
    "maxtext": [
      ("muon (maxtext_muon, all-to-all Newton-Schulz), fsdp 32 x expert 8, 4 grad-accum steps of per-device batch 1",
       ["opt_type=muon", "muon_type=maxtext_muon", "muon_use_all_to_all=True", "per_device_batch_size=1",
        "gradient_accumulation_steps=4", "ici_fsdp_parallelism=32", "ici_expert_parallelism=8"]),
      ("adamw, fsdp 32 x expert 8, 4 grad-accum steps of per-device batch 1", ["opt_type=adamw",
       "per_device_batch_size=1", "gradient_accumulation_steps=4", "ici_fsdp_parallelism=32",
       "ici_expert_parallelism=8"]),
    ],
  },
}  # fmt: skip


def maxtext_worker(out_json: str, out_hlo: str, argv: list[str]) -> None:
  """Runs in MaxText's venv: its train_compile.main, with jit_and_compile wrapped to keep what it compiled."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from maxtext.trainers.pre_train import train_compile

  compile_fn = train_compile.jit_and_compile
  result = {"argv": argv}

  def capture(*args, **kwargs):
    start = time.time()
    try:
      compiled = compile_fn(*args, **kwargs)
    except Exception as e:  # libtpu refuses a program that cannot fit; keep the numbers it gives
      result.update(error=str(e)[-2000:], compile_s=time.time() - start)
      with open(out_json, "w") as f:
        json.dump(result, f)
      raise
    m = compiled.memory_analysis()
    result.update(
      compile_s=time.time() - start,
      argument_bytes=m.argument_size_in_bytes,
      output_bytes=m.output_size_in_bytes,
      alias_bytes=m.alias_size_in_bytes,
      temp_bytes=m.temp_size_in_bytes,
    )
    with open(out_hlo, "w") as f:
      f.write(compiled.as_text())
    with open(out_json, "w") as f:
      json.dump(result, f)
    return compiled

  train_compile.jit_and_compile = capture
  cfg = os.path.join(os.path.dirname(train_compile.__file__), "..", "..", "configs", "base.yml")
  train_compile.main(["train_compile", os.path.normpath(cfg), *argv])


def _run(cmd: list[str], log: str, env=None) -> int:
  with open(log, "w") as f:
    return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode


def compile_maxtext(topology: str, label: str, flags: list[str], out: str) -> dict:
  tag = f"maxtext_{topology.replace(':', '_')}_" + re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
  js, hlo = os.path.join(out, tag + ".json"), os.path.join(out, tag + ".hlo")
  if not os.path.exists(js):
    argv = [*MAXTEXT_BASE, f"compile_topology={PLANS[topology]['topology']}", *flags]
    python = os.path.join(MAXTEXT_VENV, "bin", "python")
    _run([python, os.path.abspath(__file__), "--maxtext-worker", js, hlo, *argv], os.path.join(out, tag + ".log"))
  with open(js) as f:
    r = json.load(f)
  r["label"], r["hlo"] = f"MaxText 0.2.5 ({label})", hlo
  return r


def compile_ours(topology: str, out: str) -> dict:
  tag = f"ours_{topology.replace(':', '_')}"
  js, hlo = os.path.join(out, tag + ".json"), os.path.join(out, tag + ".hlo")
  if not os.path.exists(js):
    cmd = [sys.executable, "-m", "kimi_jax.tools.aot", "--config", "configs/kimi_k2.py", "--topology", topology]
    cmd += [*PLANS[topology]["ours"], "--hlo_out", hlo, "--json"]
    with open(js + ".part", "w") as f, open(os.path.join(out, tag + ".log"), "w") as log:
      subprocess.run(cmd, stdout=f, stderr=log, cwd=ROOT, check=True)
    os.replace(js + ".part", js)  # only a finished compile is reused
  with open(js) as f:
    r = json.loads(f.read().strip().splitlines()[-1])
  r["label"] = "kimi-jax (" + ", ".join(o.removeprefix("--config.") for o in PLANS[topology]["ours"]) + ")"
  r["peak"] = r.get("peak_bytes_per_chip", r["temp_bytes_per_chip"])
  if r.get("error"):
    r["error"] = f"{r['error']}: {r['temp_bytes_per_chip'] / 1e9:.1f} GB of temporaries"
  r["hlo"] = hlo
  return r


def model_flops(chips: int) -> float:
  """6 x active params x tokens + causal attention, from our ModelConfig (same architecture as MaxText's)."""
  from kimi_jax.model_stats import train_flops_per_step
  from kimi_jax.train_config import load_run_config, model_config

  return train_flops_per_step(model_config(load_run_config("configs/kimi_k2.py")), GLOBAL_BATCH, SEQ) / chips


def row(r: dict, chips: int) -> dict:
  from kimi_jax.tools.hlo import hlo_stats

  peak = r.get("peak") or (
    r.get("argument_bytes", 0) + r.get("output_bytes", 0) - r.get("alias_bytes", 0) + r.get("temp_bytes", 0)
  )
  out = {"label": r["label"], "peak": peak, "fits": "error" not in r and peak <= HBM, "error": r.get("error")}
  if "error" in r or not os.path.exists(r["hlo"]):
    return out
  with open(r["hlo"]) as f:
    s = hlo_stats(f.read(), chips)
  useful = model_flops(chips)
  remat = s["remat_dot_flops"] / s["forward_dot_flops"] if s["forward_dot_flops"] else 0.0
  compute = useful * (3 + remat) / 3 + s["other_dot_flops"]
  t_flops, t_hbm = compute / PEAK_FLOPS, s["hbm_bytes"] / HBM_BW
  t_ici = sum(s["collective_traffic_bytes"].values()) / ICI_BW
  step = max(t_flops, t_hbm, t_ici)
  return {
    **out,
    "model_flops": useful,
    "remat": remat,
    "optimizer_flops": s["other_dot_flops"],
    "compute_flops": compute,
    "xla_dot_flops": s["dot_flops"],
    "hbm_bytes": s["hbm_bytes"],
    "collectives": s["collective_bytes"],
    "traffic": s["collective_traffic_bytes"],
    "t_flops": t_flops,
    "t_hbm": t_hbm,
    "t_ici": t_ici,
    "step": step,
    "mfu_bound": useful / (PEAK_FLOPS * step),
    "unknown_trips": s["unknown_trip_counts"],
  }


def print_breakdown(r: dict, chips: int, top: int) -> None:
  """Where a row's HBM bytes, ICI traffic and XLA-visible dot FLOPs go, by op_name (jax's name stack)."""
  from kimi_jax.tools.hlo import hlo_stats

  with open(r["hlo"]) as f:
    where = hlo_stats(f.read(), chips, by_op_name=True)["by_op_name"]
  print(f"\n{r['label']}: top {top} op_names per measure (per chip per step)")
  for measure in ("hbm", *KINDS, "remat"):
    items = sorted(((v, k[1]) for k, v in where.items() if k[0] == measure), reverse=True)
    total = sum(v for v, _ in items)
    if not total:
      continue
    print(
      f"  {measure}: " + (f"{total / 1e12:.2f} TFLOP" if measure == "remat" else f"{total / 1e9:.2f} GB") + " in all"
    )
    for value, name in items[:top]:
      name = re.sub(r"^jit\([^)]*\)/", "", name)[-150:]
      print(f"    {100 * value / total:5.1f} %  {name}")


def print_table(topology: str, chips: int, rows: list[dict]) -> None:
  gib = 1 << 30
  print(f"\n{topology} ({chips} chips), {GLOBAL_BATCH} x {SEQ} = {GLOBAL_BATCH * SEQ / 1e6:.2f} M tokens per step")
  head = ["program", "peak GiB", "fits", "model TF", "remat r", "optimizer TF", "compute TF", "XLA-dot TF", "HBM GB"]
  head += [f"{k} GB" for k in KINDS] + ["ICI-sent GB", "t_flops s", "t_hbm s", "t_ici s", "roofline s", "MFU bound"]
  print("| " + " | ".join(head) + " |")
  print("|" + "---|" * len(head))
  for x in rows:
    if "step" not in x:
      print(f"| {x['label']} | {x['peak'] / gib:.1f} | no | " + (x.get("error") or "")[:120].replace("\n", " "))
      continue
    cells = [x["label"], f"{x['peak'] / gib:.1f}", "yes" if x["fits"] else "**no**", f"{x['model_flops'] / 1e12:.1f}"]
    cells += [
      f"{x['remat']:.2f}",
      f"{x['optimizer_flops'] / 1e12:.1f}",
      f"{x['compute_flops'] / 1e12:.1f}",
      f"{x['xla_dot_flops'] / 1e12:.1f}",
    ]
    cells += [f"{x['hbm_bytes'] / 1e9:.1f}"] + [f"{x['collectives'][k] / 1e9:.2f}" for k in KINDS]
    cells += [f"{sum(x['traffic'].values()) / 1e9:.1f}", f"{x['t_flops']:.2f}", f"{x['t_hbm']:.2f}"]
    cells += [f"{x['t_ici']:.2f}", f"**{x['step']:.2f}**", f"{100 * x['mfu_bound']:.1f} %"]
    print("| " + " | ".join(cells) + " |")
  ours = next((x for x in rows if x["label"].startswith("kimi-jax") and "step" in x), None)
  theirs = [x for x in rows if x["label"].startswith("MaxText") and "step" in x and x["fits"]]
  if ours and theirs:
    print(f"ours / MaxText roofline step time: {ours['step'] / theirs[0]['step']:.2f} (goal <= 0.5), peak memory "
          f"{ours['peak'] / gib:.1f} vs {theirs[0]['peak'] / gib:.1f} GiB")  # fmt: skip


def main():
  if len(sys.argv) > 1 and sys.argv[1] == "--maxtext-worker":
    maxtext_worker(sys.argv[2], sys.argv[3], sys.argv[4:])
    return
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--topologies", default="v5p:8x8x8,v5p:8x8x4")
  p.add_argument("--out", default="/tmp/aot_vs_maxtext", help="compiled HLO, logs and reports (reused if present)")
  p.add_argument("--breakdown", type=int, default=0, help="also print each row's top N op_names by bytes")
  p.add_argument("--install", action="store_true", help=f"create {MAXTEXT_VENV} with {' '.join(MAXTEXT_PIN)}")
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  if a.install and not os.path.exists(os.path.join(MAXTEXT_VENV, "bin", "python")):
    subprocess.run(["python3.12", "-m", "venv", MAXTEXT_VENV], check=True)
    subprocess.run([os.path.join(MAXTEXT_VENV, "bin", "pip"), "install", *MAXTEXT_PIN], check=True)
  for topology in a.topologies.split(","):
    chips = {"v5p:8x8x8": 512, "v5p:8x8x4": 256}[topology]
    compiled = [compile_ours(topology, a.out)]
    rows = [row(compiled[0], chips)]
    for label, flags in PLANS[topology]["maxtext"]:
      compiled.append(compile_maxtext(topology, label, flags, a.out))
      rows.append(row(compiled[-1], chips))
      if rows[-1]["fits"]:
        break
    print_table(topology, chips, rows)
    for r in compiled if a.breakdown else []:
      if os.path.exists(r["hlo"]) and "error" not in r:
        print_breakdown(r, chips, a.breakdown)


if __name__ == "__main__":
  main()
