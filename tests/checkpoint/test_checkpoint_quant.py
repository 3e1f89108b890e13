"""FP8 (Kimi-K2-Instruct) and INT4 (Kimi-K2-Thinking) releases: dequantisation, conversion against transformers'
logits on the dequantised weights (tests/reference/make_quant_fixture.py), FP8 export, and named errors."""

import json
import shutil

from flax import nnx
from helpers.paths import TINY_FP8, TINY_INT4
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kimi_jax.checkpoint import quant, safetensors
from kimi_jax.checkpoint.convert import hf_to_orbax, orbax_to_hf
from kimi_jax.checkpoint.hf import CheckpointError, HFCheckpoint, load_state
from kimi_jax.checkpoint.host_ops import transpose_cast
from kimi_jax.checkpoint.model_io import load_model


def test_fp8_dequantize_partial_blocks_and_row_blocks():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((300, 200)).astype(np.float32)
  wq, scale = quant.fp8_quantize(w, (128, 128))
  assert wq.dtype == quant.FP8_DTYPE and scale.shape == (3, 2)
  full = quant.fp8_dequantize(wq, scale, (128, 128))
  expected = wq.astype(np.float32) * np.repeat(np.repeat(scale, 128, 0), 128, 1)[:300, :200]
  np.testing.assert_array_equal(full, expected)
  assert np.abs(full - w).max() <= np.abs(w).max() / 8  # e4m3 keeps 3 mantissa bits
  for r0, r1 in [(0, 128), (100, 290), (256, 300), (5, 6)]:  # blocks that start mid-way through a scale row
    np.testing.assert_array_equal(quant.fp8_dequantize(wq[r0:r1], scale, (128, 128), r0), full[r0:r1])
    transposed = quant.fp8_dequantize(wq[r0:r1], scale, (128, 128), r0, transpose=True)
    assert transposed.flags.c_contiguous
    np.testing.assert_array_equal(transposed, full[r0:r1].T)


def test_int4_pack_unpack_and_dequantize():
  rng = np.random.default_rng(1)
  q = rng.integers(-8, 8, size=(5, 64))
  packed = quant.int4_pack(q)
  assert packed.dtype == np.int32 and packed.shape == (5, 8)
  # value 8g + i sits in column g at bits [4i, 4i + 4) as q + 8
  assert (packed[2, 3].view(np.uint32) >> 8) & 0xF == q[2, 8 * 3 + 2] + 8
  np.testing.assert_array_equal(quant.int4_unpack(packed, 64), q)
  np.testing.assert_array_equal(quant.int4_unpack(packed, 64, transpose=True), q.T)
  scale = rng.random((5, 2)).astype(ml_dtypes.bfloat16)
  expected = q * np.repeat(scale.astype(np.float32), 32, axis=1)
  np.testing.assert_array_equal(quant.int4_dequantize(packed, scale, 64, 32), expected)
  np.testing.assert_array_equal(quant.int4_dequantize(packed, scale, 64, 32, transpose=True), expected.T)


@pytest.mark.parametrize("src", [quant.FP8_DTYPE, ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("dst", [ml_dtypes.bfloat16, np.float32])
def test_transpose_cast(src, dst):
  x = np.random.default_rng(2).standard_normal((300, 130)).astype(src)
  out = transpose_cast(x, dst, transpose=True)
  assert out.dtype == dst and out.flags.c_contiguous
  np.testing.assert_array_equal(out, x.T.astype(dst))


@pytest.mark.parametrize("fixture", [TINY_FP8, TINY_INT4], ids=lambda p: p.name)
def test_dequantised_weights_match_torch(fixture):
  ref = np.load(fixture / "reference.npz")
  ckpt = HFCheckpoint(fixture)
  spots = [k for k in ref.files if k.startswith("dequant/")]
  assert spots
  for key in spots:
    name = key.removeprefix("dequant/")
    np.testing.assert_array_equal(ckpt.read(name), ref[key])
    r0, r1 = len(ref[key]) // 3, len(ref[key]) - 1
    np.testing.assert_array_equal(ckpt.read(name, (r0, r1), transpose=True), ref[key][r0:r1].T)


@pytest.mark.parametrize("fixture", [TINY_FP8, TINY_INT4], ids=lambda p: p.name)
def test_quantised_release_converts_and_matches_transformers(fixture, tmp_path):
  ref = np.load(fixture / "reference.npz")
  hf_to_orbax(str(fixture), str(tmp_path / "ckpt"), workers=2)
  _, model = load_model(str(tmp_path / "ckpt"), dtype="float32")
  logits = nnx.jit(lambda m, t: m(t)[0])(model, jnp.asarray(ref["tokens"]))  # jit: compiles faster than eager
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)


def test_fp8_export_reproduces_the_release_layout(tmp_path):
  hf_to_orbax(str(TINY_FP8), str(tmp_path / "ckpt"))
  orbax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), fp8=True)
  src, out = HFCheckpoint(TINY_FP8), HFCheckpoint(str(tmp_path / "hf"))
  assert sorted(src.weight_map) == sorted(out.weight_map)
  for name in src.weight_map:
    a, b = src._file(name), out._file(name)
    assert a.info(name) == b.info(name), name
  assert out.hf_config["quantization_config"] == src.hf_config["quantization_config"]
  for name in src.weight_map:
    if name.endswith("_scale_inv"):
      continue
    # Re-quantising dequantised FP8 weights finds the same blocks: equal up to the rounding of the scales.
    np.testing.assert_allclose(
      out.read(name).astype(np.float32), src.read(name).astype(np.float32), rtol=1e-6, atol=0, err_msg=name
    )


# Named errors ------------------------------------------------------------------------------------------------------


def _rewrite(shard, change):
  f = safetensors.SafetensorsFile(str(shard))
  tensors = change([(n, f.get(n)) for n in f.names()])
  f.close()
  safetensors.write(str(shard), tensors)


def _copy(src, tmp_path):
  shutil.copytree(src, tmp_path / "hf")
  return tmp_path / "hf"


def test_fp8_scale_of_wrong_shape_is_named(tmp_path):
  d = _copy(TINY_FP8, tmp_path)
  name = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"
  _rewrite(d / "model-00001-of-00002.safetensors", lambda ts: [(n, t[:, :1] if n == name else t) for n, t in ts])
  ckpt = HFCheckpoint(str(d))
  with pytest.raises(CheckpointError, match=rf"{name}.*model-00001-of-00002.*shape \(2, 1\).*\(2, 2\)"):
    load_state(ckpt, ckpt.config())


def test_int4_scale_of_wrong_shape_is_named(tmp_path):
  d = _copy(TINY_INT4, tmp_path)
  name = "model.layers.2.mlp.experts.1.down_proj.weight_scale"
  _rewrite(
    d / "model-00002-of-00002.safetensors",
    lambda ts: [(n, np.concatenate([t, t], 1) if n == name else t) for n, t in ts],
  )
  ckpt = HFCheckpoint(str(d))
  with pytest.raises(CheckpointError, match=rf"{name}.*model-00002-of-00002.*shape \(64, 2\).*\(64, 1\)"):
    load_state(ckpt, ckpt.config())


def test_fp8_weight_without_scale_is_named(tmp_path):
  d = _copy(TINY_FP8, tmp_path)
  index = json.loads((d / "model.safetensors.index.json").read_text())
  del index["weight_map"]["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"]
  (d / "model.safetensors.index.json").write_text(json.dumps(index))
  ckpt = HFCheckpoint(str(d))
  with pytest.raises(CheckpointError, match=r"experts\.3\.up_proj\.weight.*model-00001.*no .*_scale_inv"):
    load_state(ckpt, ckpt.config())


def _edit_header(shard, edit):
  """Rewrite a shard's JSON header in place (data offsets count from the data start, so it may grow)."""
  raw = shard.read_bytes()
  n = int.from_bytes(raw[:8], "little")
  header = json.loads(raw[8 : 8 + n])
  edit(header)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  shard.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])


def test_unknown_dtype_is_named(tmp_path):
  d = _copy(TINY_FP8, tmp_path)
  _edit_header(d / "model-00002-of-00002.safetensors", lambda h: h["model.norm.weight"].update(dtype="F8_E5M2"))
  with pytest.raises(safetensors.SafetensorsError, match=r"model-00002-of-00002.*model\.norm\.weight.*F8_E5M2"):
    HFCheckpoint(str(d)).read("model.norm.weight")


def test_header_size_mismatch_is_named(tmp_path):
  d = _copy(TINY_FP8, tmp_path)
  name = "model.layers.2.self_attn.o_proj.weight_scale_inv"
  _edit_header(d / "model-00002-of-00002.safetensors", lambda h: h[name].update(shape=[2, 2]))
  with pytest.raises(
    safetensors.SafetensorsError, match=rf"model-00002-of-00002.*{name}.*has 8 bytes but F32\(2, 2\) needs 16"
  ):
    HFCheckpoint(str(d)).read("model.layers.2.self_attn.o_proj.weight")


def test_unsupported_quantization_config_is_named(tmp_path):
  d = _copy(TINY_INT4, tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match=r"config\.json.*num_bits 4"):
    HFCheckpoint(str(d))
