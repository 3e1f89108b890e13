"""kimi_jax.tools.aot: compiling the real train step for a TPU topology on this CPU host (libtpu)."""

import pytest

from kimi_jax.tools import aot
from kimi_jax.train_config import base_config


def test_collective_bytes_reads_result_shapes():
  text = """
  %a = (bf16[8,576,576]{2,1,0:T(8,128)}, f32[8]{0}) all-reduce(%x, %y), replica_groups={{0,1}}
  %b = f32[2,3]{1,0} all-gather(%c), dimensions={0}
  %d = bf16[4,16]{1,0} all-to-all(%e), dimensions={0}
  %f = f32[] add(%g, %h)
  """
  got = aot.collective_bytes(text)
  assert got["all-reduce"] == 8 * 576 * 576 * 2 + 8 * 4
  assert got["all-gather"] == 24 and got["all-to-all"] == 128 and got["reduce-scatter"] == 0


def _tiny_run(**overrides):
  c = base_config("tiny")
  c.model.update(moe_impl="auto", attention_impl="auto")  # the Pallas kernels, as on a real TPU
  c.update(batch_size=8, seq_len=64, mesh="fsdp=2,expert=2", optimizer="muon_clip", **overrides)
  return c


def test_train_step_compiles_for_v5p_and_reports_memory():
  report = aot.compile_train_step(_tiny_run(), "v5p:2x2x1")
  assert report["chips"] == 4 and report["mesh"]["expert"] == 2
  assert report["fits"] and 0 < report["peak_bytes_per_chip"] < report["hbm_bytes_per_chip"]
  assert report["compiled_flops_per_step"] > 0.5 * report["flops_per_step"]


def test_unknown_chip_is_named():
  with pytest.raises(ValueError, match="unknown chip 'v9'"):
    aot.topology_devices("v9:2x2")
