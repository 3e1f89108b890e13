"""HF ⇄ Orbax conversion, the forward CLI, and clear errors on bad checkpoints and tokens."""

import json
import os
import shutil
import subprocess
import sys

from flax import nnx
from helpers.paths import TINY_HF
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.checkpoint import safetensors
from kimi_jax.checkpoint.convert import hf_to_orbax, orbax_to_hf
from kimi_jax.checkpoint.hf import CheckpointError, HFCheckpoint, load_state
from kimi_jax.checkpoint.model_io import load_model
from kimi_jax.config import tiny
from kimi_jax.model import check_tokens


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("orbax") / "ckpt")
  hf_to_orbax(str(TINY_HF), out)
  return out


def test_converted_checkpoint_matches_transformers(converted):
  ref = np.load(TINY_HF / "reference.npz")
  cfg, model = load_model(converted, dtype="float32")
  assert cfg.hidden_size == 64
  logits = nnx.jit(lambda m, t: m(t)[0])(model, jnp.asarray(ref["tokens"]))  # jit: compiles faster than eager
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)


def test_hf_orbax_hf_round_trip_is_bit_identical(converted, tmp_path):
  orbax_to_hf(converted, str(tmp_path))
  src, out = HFCheckpoint(TINY_HF), HFCheckpoint(str(tmp_path))
  assert sorted(src.weight_map) == sorted(out.weight_map)
  for name in src.weight_map:
    a, b = src._file(name).get(name), out._file(name).get(name)
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert a.tobytes() == b.tobytes(), name


def _copy_fixture(tmp_path):
  d = tmp_path / "hf"
  shutil.copytree(TINY_HF, d)
  return d


def test_missing_tensor_is_named(tmp_path):
  d = _copy_fixture(tmp_path)
  index = json.loads((d / "model.safetensors.index.json").read_text())
  del index["weight_map"]["model.layers.2.mlp.experts.5.up_proj.weight"]
  (d / "model.safetensors.index.json").write_text(json.dumps(index))
  ckpt = HFCheckpoint(str(d))
  with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight.*missing"):
    load_state(ckpt, ckpt.config())


def test_missing_shard_is_named(tmp_path):
  d = _copy_fixture(tmp_path)
  os.remove(d / "model-00002-of-00002.safetensors")
  ckpt = HFCheckpoint(str(d))
  with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
    load_state(ckpt, ckpt.config())


def test_shape_mismatch_is_named(tmp_path):
  d = _copy_fixture(tmp_path)
  shard = d / "model-00002-of-00002.safetensors"
  f = safetensors.SafetensorsFile(str(shard))
  tensors = [(n, np.array(f.get(n))) for n in f.names()]
  name = "model.layers.2.self_attn.kv_b_proj.weight"
  tensors = [(n, t[:-1] if n == name else t) for n, t in tensors]
  del f
  safetensors.write(str(shard), tensors)
  ckpt = HFCheckpoint(str(d))
  with pytest.raises(CheckpointError, match=rf"{name}.*model-00002-of-00002.*shape \(127, 16\).*\(128, 16\)"):
    load_state(ckpt, ckpt.config())


def test_truncated_file_is_named(tmp_path):
  d = _copy_fixture(tmp_path)
  shard = d / "model-00001-of-00002.safetensors"
  shard.write_bytes(shard.read_bytes()[:-100])
  ckpt = HFCheckpoint(str(d))
  with pytest.raises(safetensors.SafetensorsError, match="model-00001-of-00002.*truncated"):
    load_state(ckpt, ckpt.config())


def test_config_that_does_not_match_the_tensors(tmp_path):
  d = _copy_fixture(tmp_path)
  hf = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**hf, "moe_intermediate_size": 48}))
  ckpt = HFCheckpoint(str(d))
  with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight.*\(32, 64\)"):
    load_state(ckpt, ckpt.config())


def test_token_outside_vocab_is_an_error():
  cfg = tiny()
  check_tokens(np.array([[0, cfg.vocab_size - 1]]), cfg)
  with pytest.raises(ValueError, match=r"token id 512 at position \(0, 1\).*\[0, 512\)"):
    check_tokens(np.array([[3, 512]]), cfg)
  with pytest.raises(ValueError, match="integer array"):
    check_tokens(np.zeros((2, 3), np.float32), cfg)


def _run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env)


def test_forward_cli(converted, tmp_path):
  ref = np.load(TINY_HF / "reference.npz")
  np.save(tmp_path / "t.npy", ref["tokens"])
  out = _run(
    "kimi_jax.forward",
    "--checkpoint",
    converted,
    "--tokens",
    str(tmp_path / "t.npy"),
    "--out",
    str(tmp_path / "l.npy"),
    "--dtype",
    "float32",
  )
  assert out.returncode == 0, out.stderr[-2000:]
  np.testing.assert_allclose(np.load(tmp_path / "l.npy"), ref["logits"], atol=1e-4, rtol=0)
  bad = ref["tokens"].copy()
  bad[1, 3] = 300
  np.save(tmp_path / "bad.npy", bad)
  out = _run(
    "kimi_jax.forward",
    "--checkpoint",
    converted,
    "--tokens",
    str(tmp_path / "bad.npy"),
    "--out",
    str(tmp_path / "l.npy"),
  )
  assert out.returncode != 0 and "token id 300 at position (1, 3)" in out.stderr
