"""Make tests/reference/data/muon_torch.npz: parameter trajectories from torch.optim.Muon and torch.optim.AdamW.

Regenerate (needs torch >= 2.9, which ships torch.optim.Muon; never imported by kimi_jax or its tests):
  /work/refenv/bin/python tests/reference/make_muon_fixture.py

What torch does (torch/optim/_muon.py) and how it relates to ours:
  - momentum: B ← lerp(B, G, 1 − μ) = μB + (1 − μ)G and Nesterov input lerp(G, B, μ) = (1 − μ)G + μB. That is
    (1 − μ) times our M = μM + G, G + μM; Newton–Schulz divides by the Frobenius norm, so the factor cancels up to
    eps (torch: X / max(‖X‖, 1e-7), ours: X / (‖X‖ + 1e-7); both negligible here).
  - Newton–Schulz: casts to bf16, transposes tall matrices, 5 quintic steps (3.4445, −4.7750, 2.0315).
  - update: W ← W(1 − ηλ) − η · 0.2 · sqrt(max(A, B)) · O with adjust_lr_fn="match_rms_adamw".
Two Muon trajectories: "fp32" with torch's Newton–Schulz replicated in float32 (a monkeypatch of
_zeropower_via_newtonschulz that only changes the cast), for a tight comparison; "bf16" as shipped, for a loose
one. Gradients are fixed random arrays (stored), so no model or loss is involved.
"""

import pathlib

import numpy as np
import torch
from torch.optim import _muon

LR, WD, MOMENTUM, STEPS = 0.05, 0.1, 0.95, 5
ADAM_BETAS, ADAM_EPS = (0.9, 0.95), 1e-8
SHAPES = {"tall": (32, 16), "wide": (16, 40)}
VEC = 24
OUT = pathlib.Path(__file__).parent / "data" / "muon_torch.npz"


def ns_fp32(grad, ns_coefficients, ns_steps, eps):
  """torch's _zeropower_via_newtonschulz with the bf16 cast replaced by float32; otherwise verbatim.

  The cast copies (as .bfloat16() does), so the in-place div_ below cannot touch the momentum buffer.
  """
  a, b, c = ns_coefficients
  ortho_grad = grad.to(torch.float32, copy=True)
  if grad.size(0) > grad.size(1):
    ortho_grad = ortho_grad.T
  ortho_grad.div_(ortho_grad.norm().clamp(min=eps))
  for _ in range(ns_steps):
    gram_matrix = ortho_grad @ ortho_grad.T
    gram_update = torch.addmm(gram_matrix, gram_matrix, gram_matrix, beta=b, alpha=c)
    ortho_grad = torch.addmm(ortho_grad, gram_update, ortho_grad, beta=a)
  if grad.size(0) > grad.size(1):
    ortho_grad = ortho_grad.T
  return ortho_grad


def trajectory(opt_cls, w0, grads, **kwargs):
  """[STEPS, *w0.shape]: the param after each of STEPS steps fed the stored gradients."""
  p = torch.nn.Parameter(torch.tensor(w0))
  opt = opt_cls([p], lr=LR, weight_decay=WD, **kwargs)
  out = []
  for g in grads:
    p.grad = torch.tensor(g)
    opt.step()
    out.append(p.detach().numpy().copy())
  return np.stack(out)


def main():
  rng = np.random.default_rng(0)
  data = {"lr": LR, "weight_decay": WD, "momentum": MOMENTUM, "adam_b1": ADAM_BETAS[0], "adam_b2": ADAM_BETAS[1]}
  muon = dict(momentum=MOMENTUM, adjust_lr_fn="match_rms_adamw")
  for name, shape in SHAPES.items():
    w0 = rng.standard_normal(shape, dtype=np.float32) * 0.1
    grads = rng.standard_normal((STEPS, *shape), dtype=np.float32)
    data[f"{name}_w0"], data[f"{name}_grads"] = w0, grads
    data[f"{name}_bf16"] = trajectory(torch.optim.Muon, w0, grads, nesterov=True, **muon)
    shipped, _muon._zeropower_via_newtonschulz = _muon._zeropower_via_newtonschulz, ns_fp32
    try:
      data[f"{name}_fp32"] = trajectory(torch.optim.Muon, w0, grads, nesterov=True, **muon)
      data[f"{name}_fp32_plain"] = trajectory(torch.optim.Muon, w0, grads, nesterov=False, **muon)
    finally:
      _muon._zeropower_via_newtonschulz = shipped
  w0 = rng.standard_normal(VEC, dtype=np.float32)
  grads = rng.standard_normal((STEPS, VEC), dtype=np.float32)
  data["vec_w0"], data["vec_grads"] = w0, grads
  data["vec_adamw"] = trajectory(torch.optim.AdamW, w0, grads, betas=ADAM_BETAS, eps=ADAM_EPS)
  OUT.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(OUT, **data)
  print(f"wrote {OUT} ({OUT.stat().st_size} bytes) with torch {torch.__version__}")


if __name__ == "__main__":
  main()
