"""kimi_jax.tools.aot for GPUs: the real train step compiled for H100s on this CPU host, through the CUDA plugin's
compile-only topology (kimi_jax/tools/gpu_target.py). Skipped where the plugin is absent: it is ~5 GB of NVIDIA
wheels, kept out of the project's environment; run these with the venv that has it (`/work/gpu-venv/bin/python -m
pytest -m slow tests/train/test_aot_gpu.py`, see benchmarks/gpu_aot.py). The proxy and full-K2 comparisons are
`benchmarks/gpu_aot.py --step proxy|k2`.
"""

import pytest

from kimi_jax.tools import aot, gpu_target
from kimi_jax.train_config import base_config

pytestmark = pytest.mark.skipif(
  not gpu_target.have_cuda_plugin(),
  reason="jax-cuda12-plugin is not installed (see benchmarks/gpu_aot.py), so no GPU compiler on this host",
)

# Our Pallas GPU kernels a training step launches: expert matmuls forward and backward, flash attention.
TRAIN_KERNELS = {"gmm_gpu", "tgmm_gpu", "flash_fwd_gpu", "flash_dq_gpu", "flash_dkv_gpu"}


def test_h100_topology_devices():
  devices = aot.topology_devices("h100:2x1x4")
  assert len(devices) == 8 and {d.platform for d in devices} == {"gpu"}
  assert devices[0].device_kind == "NVIDIA H100 80GB HBM3"
  assert len({d.process_index for d in devices}) == 2  # two nodes ("slices") of four


@pytest.mark.slow  # ~60 s on 2 cores
def test_train_step_compiles_for_h100_with_the_pallas_kernels(tmp_path):
  c = base_config("tiny")
  c.model.update(moe_impl="pallas", attention_impl="pallas")
  c.update(batch_size=8, seq_len=64, mesh="expert=2", optimizer="muon_clip")
  hlo = tmp_path / "step.hlo"
  report = aot.compile_train_step(c, "h100:1x1x2", hlo_out=str(hlo))
  assert report["chips"] == 2 and report["mesh"]["expert"] == 2
  assert report["fits"] and 0 < report["peak_bytes_per_chip"] < report["hbm_bytes_per_chip"] == 80 << 30
  text = hlo.read_text()
  triton = [line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
  assert {name for name in TRAIN_KERNELS if any(f'name = "{name}"' in line for line in triton)} == TRAIN_KERNELS
  assert report["hlo_dot_flops_per_chip"] > 0 and report["hlo_hbm_bytes_accessed_per_chip"] > 0
