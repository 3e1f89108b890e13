"""Pallas kernels for kimi-jax: TPU (Mosaic) and GPU (Triton) with XLA references.

Standalone: depends on jax only and never imports kimi_jax. Every public function
takes impl="auto"|"xla"|"tpu"|"gpu" ("auto": tpu on TPU, gpu on GPU, xla elsewhere)
and interpret=True to run the Pallas kernels on CPU.

  gmm(lhs[M, K], rhs[G, K, N], group_sizes[GT]) -> [M, N]         grouped matmul (MoE)
  tgmm(lhs[M, K], dout[M, N], group_sizes[GT]) -> [G, K, N]       its rhs gradient
  flash_attention(q[B, S, H, Dqk], k, v[B, S, H, Dv]) -> [B, S, H, Dv] (+ max logits [H])
  mla_decode(q_latent[B, H, C], q_rope[B, H, R], cache_latent[B, T, C],
             cache_rope[B, T, R], lengths[B], softmax_scale) -> [B, H, C]
  matrix_iteration.matrix_iteration(x[B, m, n], step, num_steps) -> [B, m, n]
                                    step^num_steps per matrix, held in VMEM (TPU; xla elsewhere)
"""

from pallas_kernels import matrix_iteration
from pallas_kernels.flash_attention import attention_reference, flash_attention
from pallas_kernels.grouped_matmul import gmm, gmm_reference, tgmm, tgmm_reference
from pallas_kernels.mla_decode import mla_decode, mla_decode_reference

__all__ = [
  "gmm",
  "tgmm",
  "flash_attention",
  "mla_decode",
  "matrix_iteration",
  "gmm_reference",
  "tgmm_reference",
  "attention_reference",
  "mla_decode_reference",
]
