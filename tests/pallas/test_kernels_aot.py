"""Ahead-of-time checks that the kernels build for real hardware, on this CPU host.

Run with libtpu installed for the TPU half (`pip install libtpu`); otherwise it skips.

TPU: compile (Pallas -> Mosaic -> libtpu, which also checks VMEM use and layouts that
interpret mode ignores) for TPU topologies from jax.experimental.topologies.
GPU: lower to Triton IR for an abstract H100 (catches Triton lowering errors; PTX
generation and the kernel launch are only checked on a real GPU).
Kernels are built at production-like shapes with their default tiles.
"""

import importlib.util
import os

import jax
import jax.experimental.topologies
import jax.numpy as jnp
import pytest

import pallas_kernels as pk

# The topology client opens libtpu without a TPU; let it coexist with other processes.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
  not HAVE_LIBTPU, reason="libtpu is not installed (pip install libtpu), so no TPU compiler"
)

# v5p and v6e (pods), v5e (Colab's TPU runtime, and v5litepod slices), v4. libtpu takes "<chip>:<shape>" (v5e and
# v6e 2-D, v4 and v5p 3-D); v4 compiles are slow-marked to keep the default run short.
TOPOLOGIES = ["v5p:2x2x1", "v6e:2x2", "v5e:2x2", pytest.param("v4:2x2x1", marks=pytest.mark.slow)]


def _tpu_target(topology):
  """(aval factory placed on one chip of the topology, context naming that chip).

  Pallas asks the "current" TPU for its generation; on a CPU host the abstract mesh
  supplies it.
  """
  from jax.experimental import topologies

  device = topologies.get_topology_desc(topology, "tpu").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  abstract = jax.sharding.AbstractDevice(
    device_kind=device.device_kind, num_cores=getattr(device, "num_cores", None), platform="tpu"
  )
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=abstract)
  aval = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return aval, jax.sharding.use_abstract_mesh(mesh)


def _compile_for_tpu(topology, f, *shapes):
  aval, ctx = _tpu_target(topology)
  with ctx:
    compiled = jax.jit(f).trace(*(aval(*sd) for sd in shapes)).lower().compile()
  assert compiled.memory_analysis() is not None
  return compiled


def _gmm_fwd_bwd(impl):
  def f(lhs, rhs, sizes, offset, dout):
    out, vjp = jax.vjp(lambda a, b: pk.gmm(a, b, sizes, impl=impl, group_offset=offset), lhs, rhs)
    return (out, *vjp(dout))

  return f


# Kimi K2 expert up-projection with 8 of 384 experts local; and a small f32 case.
GMM_SHAPES = [(8192, 7168, 2048, 8, 384, jnp.bfloat16), (512, 256, 384, 4, 4, jnp.float32)]


@needs_libtpu
@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("shape", GMM_SHAPES, ids=["k2_bf16", "small_f32"])
def test_gmm_compiles_for_tpu(topology, shape):
  m, k, n, g, gt, dtype = shape
  _compile_for_tpu(
    topology,
    _gmm_fwd_bwd("tpu"),
    ((m, k), dtype),
    ((g, k, n), dtype),
    ((gt,), jnp.int32),
    ((), jnp.int32),
    ((m, n), dtype),
  )


def _lower_for_gpu(f, *avals):
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(f).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("shape", GMM_SHAPES, ids=["k2_bf16", "small_f32"])
def test_gmm_lowers_to_triton(shape):
  m, k, n, g, gt, dtype = shape
  s = jax.ShapeDtypeStruct
  text = _lower_for_gpu(
    _gmm_fwd_bwd("gpu"), s((m, k), dtype), s((g, k, n), dtype), s((gt,), jnp.int32), s((), jnp.int32), s((m, n), dtype)
  )
  assert text.count("__gpu$xla.gpu.triton") == 3  # gmm, dlhs gmm, drhs tgmm


def _flash_fwd_bwd(impl):
  def f(q, k, v, seg, dout):
    fn = lambda q, k, v: pk.flash_attention(q, k, v, segment_ids=seg, impl=impl, return_max_logits=True)
    (out, mx), vjp = jax.vjp(fn, q, k, v)
    return (out, mx, *vjp((dout, jnp.zeros_like(mx))))

  return f


def _flash_shapes(dtype, b=1, s=4096, h=8, dqk=192, dv=128):
  """K2 MLA attention per device: 8 of 64 heads (tensor parallel), 4k packed context."""
  return (
    ((b, s, h, dqk), dtype),
    ((b, s, h, dqk), dtype),
    ((b, s, h, dv), dtype),
    ((b, s), jnp.int32),
    ((b, s, h, dv), dtype),
  )


@needs_libtpu
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_flash_attention_compiles_for_tpu(topology):
  _compile_for_tpu(topology, _flash_fwd_bwd("tpu"), *_flash_shapes(jnp.bfloat16))


@needs_libtpu
@pytest.mark.slow
def test_flash_attention_f32_short_compiles_for_tpu():
  _compile_for_tpu("v5p:2x2x1", _flash_fwd_bwd("tpu"), *_flash_shapes(jnp.float32, s=300))


def test_flash_attention_lowers_to_triton():
  shapes = _flash_shapes(jnp.bfloat16, s=1024)
  text = _lower_for_gpu(_flash_fwd_bwd("gpu"), *(jax.ShapeDtypeStruct(*sd) for sd in shapes))
  assert text.count("__gpu$xla.gpu.triton") == 3  # fwd, dkv, dq
  assert "x256x" not in text  # Dqk 192 runs as 128 + 64 chunks, not zero-padded to 256


# K2 decode: 64 heads, latent 512, rope 64, 8k cache, batch 8.
MLA_SHAPES = (
  ((8, 64, 512), jnp.bfloat16),
  ((8, 64, 64), jnp.bfloat16),
  ((8, 8192, 512), jnp.bfloat16),
  ((8, 8192, 64), jnp.bfloat16),
  ((8,), jnp.int32),
)


def _mla(impl):
  return lambda *args: pk.mla_decode(*args, 0.13, impl=impl)


@needs_libtpu
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_mla_decode_compiles_for_tpu(topology):
  _compile_for_tpu(topology, _mla("tpu"), *MLA_SHAPES)


def test_mla_decode_lowers_to_triton():
  text = _lower_for_gpu(_mla("gpu"), *(jax.ShapeDtypeStruct(*sd) for sd in MLA_SHAPES))
  assert "__gpu$xla.gpu.triton" in text


# The proxy model's Muon matrices (wide orientation): experts, q_b, kv_a (m = 160: not a multiple of 128), o,
# the dense MLP; and a 576 × 2048 matrix near the 32 MiB VMEM budget (K2's own matrices, 2048 × 7168 experts,
# exceed it and take the XLA loop).
NS_SHAPES = [(224, 256, 512), (7, 192, 768), (7, 160, 512), (7, 512, 512), (1, 512, 1536), (4, 576, 2048)]


@needs_libtpu
@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("shape", NS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matrix_iteration_compiles_for_tpu(topology, shape):
  b, m, n = shape
  assert pk.matrix_iteration.vmem_bytes(m, n, jnp.bfloat16) <= pk.matrix_iteration.VMEM_LIMIT_BYTES
  from kimi_jax.optim import newton_schulz_step  # the step MuonClip runs (this test may import kimi_jax)

  f = lambda x: pk.matrix_iteration.matrix_iteration(x, newton_schulz_step, 5, impl="tpu")
  compiled = _compile_for_tpu(topology, f, (shape, jnp.bfloat16))
  # Where the matrix fits the chip's VMEM the kernel is used; elsewhere (576 × 2048 on v4: libtpu reports "Used
  # 18.13M of 16.00M vmem" for the kernel) matrix_iteration takes the XLA loop instead of failing to compile.
  kind = jax.experimental.topologies.get_topology_desc(topology, "tpu").devices[0].device_kind
  uses_kernel = "tpu_custom_call" in compiled.as_text()
  assert uses_kernel == pk.matrix_iteration.fits(m, n, jnp.bfloat16, kind), (kind, uses_kernel)


def test_matrix_iteration_vmem_budget_per_chip():
  """TPU v4 has 16 MiB of VMEM per core, v5e/v5p/v6e at least 32 MiB: the largest proxy matrix fits only the latter."""
  fits = pk.matrix_iteration.fits
  assert not fits(576, 2048, jnp.bfloat16, "TPU v4") and fits(576, 2048, jnp.bfloat16, "TPU v5 lite")
  assert fits(512, 512, jnp.bfloat16, "TPU v4") and fits(576, 2048, jnp.bfloat16, "TPU v6 lite")
