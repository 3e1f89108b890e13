"""Kernel benchmark: Pallas kernels vs their XLA references, as a table.

  python benchmarks/kernels.py                 # shapes sized for the local backend
  python benchmarks/kernels.py --shapes k2     # Kimi K2 per-device shapes (TPU/GPU)
  python benchmarks/kernels.py --only gmm --iters 20

On CPU only the XLA references run: Pallas kernels execute only in interpret mode
there, whose timings mean nothing; run the same script on a TPU or GPU host to get
pallas-vs-xla rows. Columns: op, shape, impl, ms (median), TFLOP/s (useful FLOPs:
active rows for gmm, unmasked half for causal attention).
Dimensions: M rows, K, N, G groups; B batch, S sequence, H heads, D head dims;
C latent rank, R rope dim, T cache length.
"""

from __future__ import annotations

import argparse

from _timing import time_ms  # noqa: E402
import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax import backend
from kimi_jax.optim import newton_schulz_step
import pallas_kernels as pk


def _gmm_cases(big):
  # (M, K, N, G): K2 up/gate projection and down projection with 8 local experts.
  return [(8192, 7168, 2048, 8), (8192, 2048, 7168, 8)] if big else [(1024, 256, 512, 8)]


def bench_gmm(impls, big, iters, rng):
  rows = []
  for m, k, n, g in _gmm_cases(big):
    lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    rhs = jnp.asarray(rng.normal(size=(g, k, n)) / np.sqrt(k), jnp.bfloat16)
    sizes = jnp.asarray(rng.multinomial(m, np.ones(g) / g), jnp.int32)  # uneven groups
    flops = 2 * int(sizes.sum()) * k * n
    for impl in impls:
      fwd = jax.jit(lambda a, b, impl=impl, sizes=sizes: pk.gmm(a, b, sizes, impl=impl))
      grad = jax.jit(
        jax.grad(
          lambda a, b, impl=impl, sizes=sizes: pk.gmm(a, b, sizes, impl=impl).astype(jnp.float32).sum(), argnums=(0, 1)
        )
      )
      shape = f"M={m} K={k} N={n} G={g}"
      rows.append(("gmm fwd", shape, impl, time_ms(fwd, (lhs, rhs), iters), flops))
      rows.append(("gmm fwd+bwd", shape, impl, time_ms(grad, (lhs, rhs), iters), 3 * flops))
  return rows


def bench_attention(impls, big, iters, rng):
  b, s, h, dqk, dv = (1, 4096, 8, 192, 128) if big else (1, 512, 2, 64, 32)
  q, k = (jnp.asarray(rng.normal(size=(b, s, h, dqk)), jnp.bfloat16) for _ in range(2))
  v = jnp.asarray(rng.normal(size=(b, s, h, dv)), jnp.bfloat16)
  flops = 2 * b * h * s * s * (dqk + dv) // 2  # causal: half the pairs
  rows = []
  for impl in impls:
    fwd = jax.jit(lambda q, k, v, impl=impl: pk.flash_attention(q, k, v, impl=impl))
    grad = jax.jit(
      jax.grad(
        lambda q, k, v, impl=impl: pk.flash_attention(q, k, v, impl=impl).astype(jnp.float32).sum(), argnums=(0, 1, 2)
      )
    )
    shape = f"B={b} S={s} H={h} Dqk={dqk} Dv={dv}"
    rows.append(("attention fwd", shape, impl, time_ms(fwd, (q, k, v), iters), flops))
    rows.append(("attention fwd+bwd", shape, impl, time_ms(grad, (q, k, v), iters), int(3.5 * flops)))
  return rows


def bench_mla_decode(impls, big, iters, rng):
  b, h, c, r, t = (8, 64, 512, 64, 8192) if big else (4, 16, 128, 32, 1024)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  args = (f(b, h, c), f(b, h, r), f(b, t, c), f(b, t, r), jnp.full((b,), t, jnp.int32))
  flops = 2 * b * h * t * (2 * c + r)
  rows = []
  for impl in impls:
    fn = jax.jit(lambda *a, impl=impl: pk.mla_decode(*a, 0.13, impl=impl))
    rows.append(("mla_decode", f"B={b} H={h} C={c} R={r} T={t}", impl, time_ms(fn, args, iters), flops))
  return rows


def bench_newton_schulz(impls, big, iters, rng):
  """Five Newton–Schulz steps per matrix: the fused TPU kernel (matrix in VMEM) vs the XLA loop."""
  del big  # one size: the proxy model's expert matrices, 7 layers x 32 experts of 256 x 512
  b, m, n = 224, 256, 512
  x = jnp.asarray(rng.normal(size=(b, m, n)) / np.sqrt(m * n), jnp.bfloat16)
  flops = b * 5 * (4 * m * m * n + 2 * m**3)
  rows = []
  for impl in [i for i in impls if i != "gpu"]:  # no GPU kernel (see pallas_kernels/README.md)
    fn = jax.jit(lambda x, impl=impl: pk.matrix_iteration.matrix_iteration(x, newton_schulz_step, 5, impl=impl))
    rows.append(("newton_schulz x5", f"B={b} m={m} n={n}", impl, time_ms(fn, (x,), iters), flops))
  return rows


BENCHES = {
  "gmm": bench_gmm,
  "attention": bench_attention,
  "mla_decode": bench_mla_decode,
  "newton_schulz": bench_newton_schulz,
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--shapes", choices=["auto", "small", "k2"], default="auto", help="auto: k2 shapes on TPU/GPU, small ones on CPU"
  )
  parser.add_argument("--only", choices=list(BENCHES), action="append")
  parser.add_argument("--iters", type=int, default=10)
  args = parser.parse_args()

  pallas = backend.pallas_options()
  native = not pallas.get("interpret", False)  # interpret-mode timings mean nothing: XLA rows only
  impls = [pallas["impl"], "xla"] if native else ["xla"]
  big = args.shapes == "k2" or (args.shapes == "auto" and native)
  print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
  if not native:
    print("CPU: XLA references only; the Pallas kernels need a TPU or GPU (interpret-mode timings are meaningless).")
  rng = np.random.default_rng(0)
  rows = []
  for name in args.only or list(BENCHES):
    rows += BENCHES[name](impls, big, args.iters, rng)

  print(f"\n{'op':<18} {'shape':<36} {'impl':<5} {'ms':>9} {'TFLOP/s':>8}")
  for op, shape, impl, ms, flops in rows:
    print(f"{op:<18} {shape:<36} {impl:<5} {ms:>9.3f} {flops / ms / 1e9:>8.3f}")


if __name__ == "__main__":
  main()
