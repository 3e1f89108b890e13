"""Optimizer update time: muon_clip (with qk-clip) vs optax.adamw on kimi_jax-shaped param trees.

  .venv/bin/python benchmarks/optimizer.py [--trees tiny proxy] [--iters 3] [--ns-dtypes bfloat16 float32]
                                          [--ns-impls auto xla]   # on TPU: the fused kernel vs the XLA loop

Times one jit'd `tx.update` (compile excluded, after a warm-up call; median of --iters) on whatever device JAX
picks; about 2 minutes on 2 CPU cores. AdamW is memory-bound (~28 bytes of traffic per param); muon_clip is
bound by Newton–Schulz matmuls (printed per tree), so its ratio to AdamW grows with the device's bytes/s per
FLOP/s: large on CPUs, small on TPU/GPU matrix units. On this 2-core CPU Newton–Schulz alone needs ≥ 5 s for the
proxy (656 GFLOP at the ~130 GFLOP/s its batched matmuls reach) against AdamW's ~0.6 s, so no implementation
gets near 1.5× here. benchmarks/optimizer_pod.py gives the TPU compiler's per-chip cost of the same update,
with and without the fused Pallas Newton–Schulz kernel.

Letters: D model, L layers (1 dense + L−1 MoE), H heads, Cq/Ckv q/kv latent ranks, Dn/Dr/Dv head dims,
F dense hidden, E experts, Fe expert hidden, Fs shared-expert hidden, V vocab.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kimi_jax import optim

TREES = {
  "tiny": dict(D=256, L=4, H=4, Cq=64, Ckv=32, Dn=32, Dr=16, Dv=32, F=512, E=16, Fe=128, Fs=128, V=1024),
  "proxy": dict(D=512, L=8, H=8, Cq=192, Ckv=128, Dn=64, Dr=32, Dv=64, F=1536, E=32, Fe=256, Fs=256, V=32768),
}


def param_shapes(D, L, H, Cq, Ckv, Dn, Dr, Dv, F, E, Fe, Fs, V):
  """kimi_jax's param tree (see kimi_jax/optim/kimi.py) as shapes: 1 dense layer and L − 1 MoE layers."""

  def stack(n, mlp):
    return {
      "attn_norm": {"scale": (n, D)},
      "mlp_norm": {"scale": (n, D)},
      "attn": {
        "q_a": {"kernel": (n, D, Cq)},
        "q_a_norm": {"scale": (n, Cq)},
        "q_b": {"kernel": (n, Cq, H * (Dn + Dr))},
        "kv_a": {"kernel": (n, D, Ckv + Dr)},
        "kv_a_norm": {"scale": (n, Ckv)},
        "kv_b": {"kernel": (n, Ckv, H * (Dn + Dv))},
        "o": {"kernel": (n, H * Dv, D)},
      },
      "mlp": mlp,
    }

  def ffn(n, hidden):
    return {"gate": {"kernel": (n, D, hidden)}, "up": {"kernel": (n, D, hidden)}, "down": {"kernel": (n, hidden, D)}}

  m = L - 1
  experts = {"gate": (m, E, D, Fe), "up": (m, E, D, Fe), "down": (m, E, Fe, D)}
  return {
    "embed": {"embedding": (V, D)},
    "final_norm": {"scale": (D,)},
    "lm_head": {"kernel": (D, V)},
    "dense_layers": stack(1, ffn(1, F)),
    "moe_layers": stack(m, {"router": {"kernel": (m, D, E)}, "experts": experts, "shared": ffn(m, Fs)}),
  }


def random_tree(shapes, seed):
  """Arrays of N(0, 0.02²) in place of the shapes (numpy's generator: much faster than threefry on CPU)."""
  rng = np.random.default_rng(seed)
  is_shape = lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)
  return jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s, dtype=np.float32)), shapes, is_leaf=is_shape)


def newton_schulz_flops(params, muon_dims, steps=5):
  """Matmul FLOPs of Newton–Schulz per update: per m×n matrix (m ≤ n), each step does Y·Yᵀ (2m²n), Gram²
  (2m³) and poly·Y (2m²n)."""
  total = 0
  for leaf, dims in zip(jax.tree.leaves(params), optim.resolve_muon_dims(params, muon_dims)):
    if dims is not None:
      m, n = sorted(leaf.shape[d] for d in dims)
      total += leaf.size // (m * n) * steps * (4 * m * m * n + 2 * m**3)
  return total


def time_update(tx, params, grads, iters, **extra):
  """(compile seconds, median seconds per update)."""
  state = tx.init(params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))
  t0 = time.perf_counter()
  compiled = update.lower(grads, state, params).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(grads, state, params))  # warm-up
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(grads, state, params))
    times.append(time.perf_counter() - t0)
  return compile_s, statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--trees", nargs="+", default=list(TREES), choices=list(TREES))
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--ns-dtypes", nargs="+", default=["bfloat16"], help="also try float32 (CPU: similar speed)")
  parser.add_argument(
    "--ns-impls",
    nargs="+",
    default=["auto"],
    choices=["auto", "xla", "pallas"],
    help="Newton–Schulz implementation (auto: the Pallas kernel on TPU, XLA elsewhere)",
  )
  args = parser.parse_args()

  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), median of {args.iters}, compile excluded")
  print(
    f"{'tree':6} {'params':>8} {'optimizer':26} {'update ms':>10} {'× adamw':>8} {'compile s':>10} {'NS TFLOP/s':>10}"
  )
  for name in args.trees:
    cfg = TREES[name]
    shapes = param_shapes(**cfg)
    params, grads = random_tree(shapes, 0), random_tree(shapes, 1)
    n = sum(x.size for x in jax.tree.leaves(params))
    # Above τ = 100 everywhere, so every head is clipped (the most work qk-clip can do).
    max_logits = {
      s: jnp.full((params[s]["attn"]["q_b"]["kernel"].shape[0], cfg["H"]), 150.0)
      for s in params
      if s in ("dense_layers", "moe_layers")
    }
    qk = optim.kimi_qk_clip(cfg["H"], cfg["Dn"], cfg["Dr"], cfg["Dv"])
    adamw = optax.adamw(2e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    adamw_c, adamw_t = time_update(adamw, params, grads, args.iters)
    flops = newton_schulz_flops(params, optim.kimi_muon_dims)
    rows = [("optax.adamw", adamw_c, adamw_t, "")]
    for dtype in args.ns_dtypes:
      for impl in args.ns_impls:
        tx = optim.muon_clip(2e-4, ns_dtype=jnp.dtype(dtype), ns_impl=impl, muon_dims=optim.kimi_muon_dims, qk_clip=qk)
        compile_s, t = time_update(tx, params, grads, args.iters, max_logits=max_logits)
        rows.append((f"muon_clip ({dtype}, {impl})", compile_s, t, f"{flops / t / 1e12:.3f}"))
    for label, compile_s, t, rate in rows:
      print(f"{name:6} {n / 1e6:7.1f}M {label:26} {t * 1e3:10.1f} {t / adamw_t:8.2f} {compile_s:10.1f} {rate:>10}")
    print(f"{name:6} Newton–Schulz matmuls: {flops / 1e9:.0f} GFLOP per muon_clip update")


if __name__ == "__main__":
  main()
