"""Optimizer update time: muon_clip (with qk-clip) vs optax.adamw on kimi_jax-shaped param trees.

  .venv/bin/python benchmarks/optimizer.py [--trees tiny proxy] [--iters 3] [--ns-dtypes bfloat16 float32]
                                          [--ns-impls auto xla]   # on TPU: the fused kernel vs the XLA loop
                                          [--variants quintic×5 ...] [--no-optax]

Rows: optax.adamw; optax.contrib.muon with muon_clip's routing, steps and Newton–Schulz dtype (its Newton–Schulz
runs in the momentum's dtype: mu_dtype); muon_clip (qk-clip off, as optax has none) per Newton–Schulz schedule
and form; muon_clip with its defaults and qk-clip. All compiled first, then timed round-robin. "ortho err" is each
Newton–Schulz's distance from the exact polar factor on one expert-shaped matrix (see `expert_like`).

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


def time_updates(candidates, params, grads, iters):
  """{label: (compile seconds, median seconds per update)}; candidates: [(label, tx, extra kwargs)].

  All are compiled and warmed up first, then timed round-robin (one update of each per round), so that load from
  other jobs on the machine falls on every row alike.
  """
  compiled, compile_s, states = {}, {}, {}
  for label, tx, extra in candidates:
    states[label] = tx.init(params)
    update = jax.jit(lambda g, s, p, tx=tx, extra=extra: tx.update(g, s, p, **extra))
    t0 = time.perf_counter()
    compiled[label] = update.lower(grads, states[label], params).compile()
    compile_s[label] = time.perf_counter() - t0
    jax.block_until_ready(compiled[label](grads, states[label], params))  # warm-up
  times = {label: [] for label in compiled}
  for _ in range(iters):
    for label, fn in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(grads, states[label], params))
      times[label].append(time.perf_counter() - t0)
  return {label: (compile_s[label], statistics.median(t)) for label, t in times.items()}


def expert_like(m, n, seed=0):
  """An m×n float32 matrix with singular values log-uniform in [1e-3, 1] (a momentum-like, ill-conditioned
  spectrum) and random singular vectors, with its exact polar factor U Vᵀ (float64 SVD)."""
  rng = np.random.default_rng(seed)
  k = min(m, n)
  u, _ = np.linalg.qr(rng.standard_normal((m, k)))
  v, _ = np.linalg.qr(rng.standard_normal((n, k)))
  x = (u * np.exp(rng.uniform(np.log(1e-3), 0.0, k))) @ v.T
  return x.astype(np.float32), u @ v.T


def orthogonality_error(out, polar):
  """RMS over singular directions of out − U Vᵀ: ‖out − U Vᵀ‖_F / sqrt(min(m, n))."""
  return float(np.linalg.norm(np.asarray(out, np.float64) - polar) / min(polar.shape) ** 0.5)


def optax_orthogonalize(x, mu_dtype):
  """optax.contrib.muon's Newton–Schulz on one matrix, as its update runs it (in the momentum's dtype)."""
  from optax.contrib import _muon

  coeffs = jnp.asarray(_muon._DEFAULT_NS_COEFFS)
  return _muon.orthogonalize_via_newton_schulz(jnp.asarray(x, mu_dtype or jnp.float32), coeffs, 5)


def optax_muon(routing, mu_dtype=None):
  """optax.contrib.muon with muon_clip's settings and routing: Nesterov, μ 0.95, 5 quintic steps, RMS scale 0.2,
  AdamW (β 0.9/0.95) on the rest, weight decay 0.1 on both (optax's Muon branch takes it via weight_decay)."""
  from optax.contrib import MuonDimensionNumbers, muon

  def dims(params):
    # optax calls this on masked trees too, whose optax.MaskedNode() (an empty tuple) it must get back.
    to_optax = lambda d: MuonDimensionNumbers(reduction_axis=d[0], output_axis=d[1]) if d and len(d) == 2 else d
    return jax.tree.map(to_optax, routing(params), is_leaf=lambda d: d is None or isinstance(d, tuple))

  return muon(
    2e-4,
    ns_steps=5,
    beta=0.95,
    weight_decay=0.1,
    mu_dtype=mu_dtype,
    nesterov=True,
    adam_b1=0.9,
    adam_b2=0.95,
    adam_weight_decay=0.1,
    muon_weight_dimension_numbers=dims,
    consistent_rms=0.2,
  )


# Our Newton–Schulz variants, each a muon_clip row (qk-clip off, like optax) and an orthogonality error:
# label -> (ns_coeffs, ns_steps, ns_gram)
VARIANTS = {
  "quintic×5 gram auto": ("quintic", 5, "auto"),
  "quintic×5": ("quintic", 5, False),
  "quintic×5 gram": ("quintic", 5, True),
  "polar_express×5": ("polar_express", 5, False),
  "polar_express×5 gram": ("polar_express", 5, True),
  "polar_express×4": ("polar_express", 4, False),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--trees", nargs="+", default=list(TREES), choices=list(TREES))
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--ns-dtypes", nargs="+", default=["bfloat16", "float32"])
  parser.add_argument(
    "--ns-impls",
    nargs="+",
    default=["auto"],
    choices=["auto", "xla", "pallas"],
    help="Newton–Schulz implementation (auto: the Pallas kernel on TPU, XLA elsewhere)",
  )
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--no-optax", action="store_true", help="skip the optax.contrib.muon rows")
  args = parser.parse_args()

  # Orthogonality error of each Newton–Schulz on one expert-shaped matrix (proxy experts: D 512 × Fe 256).
  x, polar = expert_like(512, 256)
  ortho = {}
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), median of {args.iters}, compile excluded")
  print(
    f"{'tree':6} {'params':>8} {'optimizer':46} {'update ms':>10} {'× adamw':>8} {'× optax':>8} {'compile s':>10}"
    f" {'NS TFLOP/s':>10} {'ortho err':>9}"
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
    flops = newton_schulz_flops(params, optim.kimi_muon_dims)
    candidates = [("optax.adamw", optax.adamw(2e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1), {})]
    for dtype in args.ns_dtypes:
      dt = jnp.dtype(dtype)
      if not args.no_optax:
        label = f"optax.contrib.muon (mu_dtype={dtype})"  # its Newton–Schulz runs in the momentum's dtype
        candidates.append((label, optax_muon(optim.kimi_muon_dims, None if dtype == "float32" else dt), {}))
        ortho[label] = orthogonality_error(optax_orthogonalize(x, None if dtype == "float32" else dt), polar)
      for impl in args.ns_impls:
        for variant in args.variants:
          coeffs, steps, gram = VARIANTS[variant]
          label = f"muon_clip {variant} ({dtype}, {impl})"
          kw = dict(ns_coeffs=coeffs, ns_steps=steps, ns_gram=gram, ns_dtype=dt, ns_impl=impl)
          tx = optim.muon_clip(2e-4, muon_dims=optim.kimi_muon_dims, qk_clip=None, **kw)
          candidates.append((label, tx, {}))
          out = optim.newton_schulz(jnp.asarray(x), steps, coeffs, dt, impl=impl, gram=gram)
          ortho[label] = orthogonality_error(out, polar)
        tx = optim.muon_clip(2e-4, ns_dtype=dt, ns_impl=impl, muon_dims=optim.kimi_muon_dims, qk_clip=qk)
        candidates.append((f"muon_clip +qk-clip ({dtype}, {impl})", tx, {"max_logits": max_logits}))
    results = time_updates(candidates, params, grads, args.iters)
    adamw_t = results["optax.adamw"][1]
    for label, (compile_s, t) in results.items():
      dtype = "float32" if "float32" in label else "bfloat16"
      optax_t = results.get(f"optax.contrib.muon (mu_dtype={dtype})", (0, float("nan")))[1]
      rate = f"{flops / t / 1e12:.3f}" if "adamw" not in label else ""
      err = f"{ortho[label]:.4f}" if label in ortho else ""
      print(
        f"{name:6} {n / 1e6:7.1f}M {label:46} {t * 1e3:10.1f} {t / adamw_t:8.2f} {t / optax_t:8.2f} {compile_s:10.1f}"
        f" {rate:>10} {err:>9}"
      )
    print(f"{name:6} Newton–Schulz matmuls: {flops / 1e9:.0f} GFLOP per update (plain quintic×5)")
    print(f"{name:6} ortho err: RMS of O − U Vᵀ on a 512×256 matrix, singular values log-uniform in [1e-3, 1]")


if __name__ == "__main__":
  main()
