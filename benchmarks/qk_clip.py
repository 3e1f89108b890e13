"""qk-clip at small scale: max attention logits under plain Muon vs MuonClip (the Kimi K2 paper's claim).

    .venv/bin/python benchmarks/qk_clip.py [--steps 200] [--tau 20] [--lr 3e-2] [--png docs/qk_clip.png]

Trains the same small K2-shaped MLA model (configs/qk_clip.py) twice with the real training loop
(`kimi_jax.train.train`), same seed and same batches: once with `qk_clip_tau=None` (plain Muon + AdamW, the
same optimizer with the clip off) and once with MuonClip at τ. Prints both curves as a table (step, loss, max
logit, heads clipped), a summary and a verdict, and saves a two-panel PNG (max logit with the τ line; loss) when
matplotlib is installed. About 3 minutes on 2 busy CPU cores at the defaults (JAX_PLATFORMS=cpu).

The logged max logit of step t is the largest scaled pre-softmax logit of step t's forward pass, i.e. *before*
step t's clip: after a clip the weights give exactly τ on that batch, and the next logged value is τ plus one
step's growth on the next batch. So under MuonClip the curve sits at τ to slightly above it, not below.

The runs see the same batches but are not bit-paired even before the first clip: compiling the clip stage in
changes the train step's float rounding by ~1 ulp from the first non-zero-lr step, which bf16 Newton–Schulz at this
lr amplifies into visibly different trajectories within ~30 steps. `--control` adds a third run with a τ that never
fires to measure that noise floor.

Verdict (exit status 1 if any check fails): plain Muon's peak ≥ 3τ; MuonClip's max logit after its
first clip ≤ 1.5τ; MuonClip's loss, averaged over the last 10% of steps, ≤ plain Muon's + 0.02 (same batches).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # train()'s progress bar; must be set before tqdm is imported

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from kimi_jax.train_config import load_run_config  # noqa: E402

PLAIN, CLIP, CONTROL = "plain_muon", "muon_clip", "muon_clip_never_fires"
NEVER = 1e30  # a τ no logit reaches: the clip stage is compiled in but never acts


def run(c, workdir: str) -> list[dict]:
  from kimi_jax.train import train

  t0 = time.perf_counter()
  train(c, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  print(f"  {len(rows)} steps in {time.perf_counter() - t0:.0f} s (compile included)\n", flush=True)
  return rows


def summarize(plain: list[dict], clip: list[dict], tau: float) -> dict:
  tail = max(1, len(plain) // 10)
  peak = lambda rows: max(rows, key=lambda r: r["max_logit"])
  first_clip = next((r["step"] for r in clip if r.get("heads_clipped", 0) > 0), None)
  after = [r["max_logit"] for r in clip if first_clip is not None and r["step"] > first_clip]
  return {
    "tau": tau,
    "plain_peak": peak(plain)["max_logit"],
    "plain_peak_step": peak(plain)["step"],
    "clip_peak": peak(clip)["max_logit"],
    "clip_peak_step": peak(clip)["step"],
    "plain_final_loss": plain[-1]["loss"],
    "clip_final_loss": clip[-1]["loss"],
    "tail_steps": tail,
    "plain_tail_loss": statistics.mean(r["loss"] for r in plain[-tail:]),
    "clip_tail_loss": statistics.mean(r["loss"] for r in clip[-tail:]),
    "plain_final_max_logit": plain[-1]["max_logit"],
    "clip_final_max_logit": clip[-1]["max_logit"],
    "first_clip_step": first_clip,
    "clip_max_after_first": max(after) if after else None,
    "clip_median_after_first": statistics.median(after) if after else None,
    "plain_first_above_tau": next((r["step"] for r in plain if r["max_logit"] > tau), None),
    "clip_steps_with_clip": sum(1 for r in clip if r.get("heads_clipped", 0) > 0),
  }


def print_table(plain: list[dict], clip: list[dict], every: int) -> None:
  print(
    f"{'step':>5} | {'plain Muon loss':>15} {'max logit':>9} | {'MuonClip loss':>13} {'max logit':>9} "
    f"{'heads clipped':>13}"
  )
  print("-" * 75)
  for p, q in zip(plain, clip):
    if p["step"] == 1 or p["step"] % every == 0 or p["step"] == plain[-1]["step"]:
      print(
        f"{p['step']:>5} | {p['loss']:>15.3f} {p['max_logit']:>9.1f} | {q['loss']:>13.3f} "
        f"{q['max_logit']:>9.1f} {q.get('heads_clipped', 0):>13d}"
      )


def print_summary(s: dict, heads: int) -> bool:
  tau = s["tau"]
  fmt = lambda v, spec=".1f": "n/a" if v is None else format(v, spec)
  print(f"\nSummary (τ = {tau:g}; max logits are the pre-clip forward-pass maxima; {heads} heads in all):")
  print(
    f"  peak max logit    plain Muon {s['plain_peak']:.1f} (step {s['plain_peak_step']}, "
    f"{s['plain_peak'] / tau:.1f}τ)   MuonClip {s['clip_peak']:.1f} (step {s['clip_peak_step']})"
  )
  print(f"  final max logit   plain Muon {s['plain_final_max_logit']:.1f}   MuonClip {s['clip_final_max_logit']:.1f}")
  print(f"  plain Muon first exceeds τ at step {fmt(s['plain_first_above_tau'], 'd')}")
  print(
    f"  MuonClip first clip at step {fmt(s['first_clip_step'], 'd')}; after it max logit ≤ "
    f"{fmt(s['clip_max_after_first'])} (median {fmt(s['clip_median_after_first'])}); "
    f"{s['clip_steps_with_clip']} steps clipped at least one head"
  )
  print(
    f"  final loss        plain Muon {s['plain_final_loss']:.3f}   MuonClip {s['clip_final_loss']:.3f}   "
    f"(mean of last {s['tail_steps']} steps: {s['plain_tail_loss']:.3f} vs {s['clip_tail_loss']:.3f})"
  )
  checks = [
    (f"plain Muon runs far past τ (peak ≥ 3τ = {3 * tau:g})", s["plain_peak"] >= 3 * tau),
    (
      f"MuonClip holds at τ after the first clip (max ≤ 1.5τ = {1.5 * tau:g})",
      s["clip_max_after_first"] is not None and s["clip_max_after_first"] <= 1.5 * tau,
    ),
    (
      f"MuonClip's loss no worse (last-{s['tail_steps']} mean ≤ plain + 0.02)",
      s["clip_tail_loss"] <= s["plain_tail_loss"] + 0.02,
    ),
  ]
  print("\nVerdict:")
  for text, ok in checks:
    print(f"  [{'PASS' if ok else 'FAIL'}] {text}")
  return all(ok for _, ok in checks)


def plot(plain: list[dict], clip: list[dict], tau: float, title: str, path: str) -> None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print(f"\nmatplotlib is not installed: no plot ({path} not written). pip install matplotlib to get it.")
    return
  steps = [r["step"] for r in plain]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
  ax1.plot(steps, [r["max_logit"] for r in plain], color="tab:red", lw=1.2, label="Muon (no clip)")
  ax1.plot(steps, [r["max_logit"] for r in clip], color="tab:blue", lw=1.2, label=f"MuonClip (τ={tau:g})")
  ax1.axhline(tau, color="k", ls="--", lw=0.8, label=f"τ = {tau:g}")
  ax1.set(xlabel="step", ylabel="max attention logit", title="Max logit (all layers and heads)")
  ax1.legend(loc="upper left", fontsize=8)
  ax1.grid(alpha=0.3)
  ax2.plot(steps, [r["loss"] for r in plain], color="tab:red", lw=1.0, alpha=0.8, label="Muon (no clip)")
  ax2.plot(steps, [r["loss"] for r in clip], color="tab:blue", lw=1.0, alpha=0.8, label=f"MuonClip (τ={tau:g})")
  ax2.set(xlabel="step", ylabel="training loss (nats/byte)", title="Loss (same batches)")
  ax2.set_ylim(top=min(4.0, max(r["loss"] for r in plain + clip)))
  ax2.legend(loc="upper right", fontsize=8)
  ax2.grid(alpha=0.3)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  print(f"\nPlot: {path} ({os.path.getsize(path) / 1024:.0f} KB)")


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=None, help="training steps per run (configs/qk_clip.py: 200)")
  p.add_argument("--tau", type=float, default=None, help="qk-clip threshold (configs/qk_clip.py: 20)")
  p.add_argument("--lr", type=float, default=None, help="peak learning rate (configs/qk_clip.py: 3e-2)")
  p.add_argument("--seed", type=int, default=None, help="model init and data order (configs/qk_clip.py: 0)")
  p.add_argument("--table-every", type=int, default=None, help="table row interval (default steps/20)")
  p.add_argument("--png", default=os.path.join(REPO, "docs", "qk_clip.png"), help="plot path ('' for none)")
  p.add_argument(
    "--control",
    action="store_true",
    help=f"a third run with τ = {NEVER:g} (clip compiled in, never fires): how far two runs that differ "
    "only in float rounding drift apart, i.e. the noise floor of the loss comparison",
  )
  p.add_argument("--json", default="", help="also write both runs' metrics and the summary here")
  p.add_argument("--workdir", default="", help="keep the two runs' workdirs here (default: a temp dir, removed)")
  args = p.parse_args()

  c = load_run_config(os.path.join(REPO, "configs", "qk_clip.py"))
  for name, value in (
    ("steps", args.steps),
    ("qk_clip_tau", args.tau),
    ("learning_rate", args.lr),
    ("seed", args.seed),
  ):
    if value is not None:
      c[name] = value
  tau = c.qk_clip_tau
  m = c.model
  layers = m.num_hidden_layers
  title = (
    f"K2-shaped MLA, {layers} layers ({m.first_k_dense_replace} dense), {m.num_attention_heads} heads, "
    f"D={m.hidden_size}; batch {c.batch_size}×{c.seq_len}; lr {c.learning_rate:g} "
    f"({c.warmup_steps} warm-up, then constant); seed {c.seed}"
  )
  print(f"qk-clip benchmark: {title}; {c.steps} steps per run, τ = {tau:g}\n", flush=True)

  root = args.workdir or tempfile.mkdtemp(prefix="qk_clip_")
  runs = {}
  try:
    for name in (PLAIN, CLIP) + ((CONTROL,) if args.control else ()):
      workdir = os.path.join(root, name)
      if os.path.exists(workdir):
        if not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
          raise SystemExit(f"{workdir} exists and is not a previous run of this benchmark; pick another --workdir")
        shutil.rmtree(workdir)  # a previous run of this benchmark: start fresh (train() would resume it)
      rc = c.copy_and_resolve_references()
      rc.qk_clip_tau = {PLAIN: None, CLIP: tau, CONTROL: NEVER}[name]
      print(f"[{name}] optimizer muon_clip, qk_clip_tau={rc.qk_clip_tau}", flush=True)
      runs[name] = run(rc, workdir)
  finally:
    if not args.workdir:
      shutil.rmtree(root, ignore_errors=True)

  plain, clip = runs[PLAIN], runs[CLIP]
  print_table(plain, clip, args.table_every or max(1, c.steps // 20))
  s = summarize(plain, clip, tau)
  ok = print_summary(s, layers * m.num_attention_heads)
  if args.control:
    ctrl = runs[CONTROL]
    s["control_tail_loss"] = statistics.mean(r["loss"] for r in ctrl[-s["tail_steps"] :])
    s["control_peak"] = max(r["max_logit"] for r in ctrl)
    first_diff = next((a["step"] for a, b in zip(plain, ctrl) if a["loss"] != b["loss"]), None)
    print(
      f"\nControl (τ = {NEVER:g}, never fires; differs from plain Muon only in float rounding, first at step "
      f"{first_diff}): peak max logit {s['control_peak']:.1f}, last-{s['tail_steps']} mean loss "
      f"{s['control_tail_loss']:.3f} (plain − control {s['plain_tail_loss'] - s['control_tail_loss']:+.3f}: "
      f"the run-to-run noise of the loss comparison)"
    )
  if args.png:
    plot(plain, clip, tau, title, args.png)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"config": c.to_dict(), "summary": s, **runs}, f)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
