"""Every choice the package makes by platform, in one place: what `auto` picks and how a Pallas kernel runs.

The platform is the one being compiled for: this host's JAX backend, or the one a `target_platform` context names
(ahead-of-time compiles for a TPU pod on a CPU host, `kimi_jax.tools.aot`), so that such a compile picks the TPU
choices and kernels. Callers read it through `platform()` only; nothing else in kimi_jax asks JAX for its backend
to decide what to run.

    kind             choices                          cpu         tpu                gpu (and other accelerators)
    moe              dense, ragged, blocked, pallas   blocked     pallas             ragged
    attention        xla, pallas                      xla         pallas             xla
    newton_schulz    xla, pallas                      xla         pallas             xla
    expert_parallel  all_to_all, ragged_all_to_all    all_to_all  ragged_all_to_all  ragged_all_to_all

`auto` uses a kernel only where it has been compiled for the platform (TPU v4, v5e, v5p, v6e, checked ahead of time in
tests/pallas/test_kernels_aot.py). GPU keeps the XLA paths: the Pallas Triton backend the GPU kernels use is
deprecated, the flash-attention backward spills registers on an H100 (tests/pallas/test_gpu_aot.py, compiled without
a GPU), and gmm and mla_decode, which compile cleanly, are unmeasured on hardware (pallas_kernels/README.md, GPU
route). XLA:CPU has no ragged all-to-all, and its
`ragged_dot` is a dense masked product, hence `blocked`. An explicit `pallas` runs the kernel natively on TPU and
GPU and in Pallas interpret mode elsewhere (`pallas_options`): slow, but it executes the kernel body, which is
what the CPU tests want.

This module imports only jax: `pallas_kernels` (standalone) keeps its own `resolve_impl` for its own users, and
`kimi_jax.optim` (jax + optax only) its own `auto`; kimi_jax passes both explicit choices from here.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib

import jax

PLATFORMS = ("cpu", "tpu", "gpu")

# What each kind accepts besides "auto".
CHOICES = {
  "moe": ("dense", "ragged", "blocked", "pallas"),
  "attention": ("xla", "pallas"),
  "newton_schulz": ("xla", "pallas"),
  "expert_parallel": ("all_to_all", "ragged_all_to_all"),
}

# How errors name each kind.
_LABELS = {
  "moe": "moe impl",
  "attention": "attention impl",
  "newton_schulz": "Newton–Schulz impl",
  "expert_parallel": "expert-parallel strategy",
}

# What "auto" picks, per kind and platform (the module docstring says why).
AUTO = {
  "moe": {"cpu": "blocked", "tpu": "pallas", "gpu": "ragged"},
  "attention": {"cpu": "xla", "tpu": "pallas", "gpu": "xla"},
  "newton_schulz": {"cpu": "xla", "tpu": "pallas", "gpu": "xla"},
  "expert_parallel": {"cpu": "all_to_all", "tpu": "ragged_all_to_all", "gpu": "ragged_all_to_all"},
}

_TARGET: list[str] = []


@contextlib.contextmanager
def target_platform(name: str) -> Iterator[None]:
  """Within the context, `platform()` is `name` ("cpu", "tpu", "gpu") instead of this host's backend: every `auto`
  and every Pallas call resolves for the target of an ahead-of-time compile. Contexts nest."""
  _TARGET.append(name)
  try:
    yield
  finally:
    _TARGET.pop()


def platform() -> str:
  """The platform being compiled for: the innermost `target_platform`, else `jax.default_backend()`; CUDA and ROCm
  read "gpu"."""
  name = _TARGET[-1] if _TARGET else jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


def resolve(kind: str, impl: str) -> str:
  """The concrete choice for `kind` (a key of CHOICES): `impl` itself if it is one of CHOICES[kind], AUTO's entry
  for `platform()` if it is "auto" (platforms other than cpu and tpu take the gpu row). Raises ValueError naming the
  kind and its choices for anything else."""
  if kind not in CHOICES:
    raise ValueError(f"unknown kind {kind!r}; choose one of {tuple(CHOICES)}")
  if impl == "auto":
    here = platform()
    return AUTO[kind][here if here in ("cpu", "tpu") else "gpu"]
  if impl not in CHOICES[kind]:
    raise ValueError(f"unknown {_LABELS[kind]} {impl!r}: {kind} takes one of {CHOICES[kind]} or 'auto'")
  return impl


def pallas_options(native: tuple[str, ...] = ("tpu", "gpu")) -> dict:
  """Keyword arguments (impl, interpret) for a `pallas_kernels` call on `platform()`.

  native: the platforms the kernel has a native version for (matrix_iteration has no GPU one: pass ("tpu",)).
  Returns {"impl": platform} there, else {"impl": "tpu", "interpret": True}: the TPU kernel in interpret mode.
  """
  here = platform()
  if here in native:
    return {"impl": here}
  return {"impl": "tpu", "interpret": True}
