"""Streaming conversion: pieces split into row blocks land in chunk-aligned Orbax arrays that restore exactly;
interrupted conversions resume; HF export from model checkpoints and training workdirs; training init."""

import json
import os

from flax import nnx
from helpers.paths import TINY_HF
import jax
import ml_dtypes
import numpy as np
import pytest

from kimi_jax.checkpoint import convert, orbax_arrays
from kimi_jax.checkpoint.hf import HFCheckpoint, flatten, load_state, unflatten
from kimi_jax.checkpoint.manager import TrainCheckpointer
from kimi_jax.checkpoint.model_io import RUN_CONFIG_FILE, init_state_from, load_model, restore_state
from kimi_jax.model_stats import abstract_model


@pytest.fixture(scope="module")
def reference():
  ckpt = HFCheckpoint(TINY_HF)
  return flatten(load_state(ckpt, ckpt.config(), np.float32))


def _assert_equal(flat, reference):
  """flat: {path: array} (see `flatten`) equal to `reference` exactly."""
  assert flat.keys() == reference.keys()
  for path, value in reference.items():
    np.testing.assert_array_equal(np.asarray(flat[path]), value, err_msg=".".join(path))


def test_block_rows():
  assert convert.block_rows((2048, 7168), 1 << 22) == 512  # a K2 expert's gate_proj: 4 pieces
  assert convert.block_rows((7168, 2048), 1 << 22) == 2048
  assert convert.block_rows((163840, 7168), 1 << 22) == 512
  assert convert.block_rows((96, 32), 1 << 22) == 96
  assert convert.block_rows((384,), 8) == 384  # 1-D tensors are never split
  assert convert.block_rows((300, 100), 1000) == 128  # at least one FP8 block row


class Killed(Exception):
  pass


def test_interrupted_conversion_resumes(tmp_path, reference, monkeypatch):
  """A crash after 40 pieces loses nothing: the rerun converts exactly the pieces not logged as done."""
  reads = []
  original = HFCheckpoint.read

  def counting_read(self, name, rows=None, **kwargs):
    reads.append(name)
    if len(reads) == crash_at:
      raise Killed()
    return original(self, name, rows, **kwargs)

  monkeypatch.setattr(HFCheckpoint, "read", counting_read)
  crash_at = 0
  convert.hf_to_orbax(str(TINY_HF), str(tmp_path / "full"), piece_elements=512)
  pieces, crash_at = len(reads), 40
  assert pieces > len(HFCheckpoint(TINY_HF).weight_map)  # some tensors were split into row blocks

  reads.clear()
  out = str(tmp_path / "ckpt")
  with pytest.raises(Killed):
    convert.hf_to_orbax(str(TINY_HF), out, workers=1, piece_elements=512)
  with open(os.path.join(out, convert.LOG_FILE)) as f:
    assert len(f.read().splitlines()) == 39
  assert not os.path.exists(os.path.join(out, "config.json"))

  reads.clear()
  crash_at = 0
  convert.hf_to_orbax(str(TINY_HF), out, workers=3, piece_elements=512)
  assert len(reads) == pieces - 39
  assert not os.path.exists(os.path.join(out, convert.LOG_FILE))
  with open(os.path.join(out, convert.STATUS_FILE)) as f:
    assert json.load(f)["complete"]
  _, model = load_model(out)
  _assert_equal(flatten(nnx.state(model, nnx.Variable).to_pure_dict()), reference)
  reads.clear()
  convert.hf_to_orbax(str(TINY_HF), out, workers=3, piece_elements=512)  # complete: nothing to do
  assert not reads
  with pytest.raises(ValueError, match="other settings"):
    convert.hf_to_orbax(str(TINY_HF), out, dtype="bfloat16", piece_elements=512)


def test_round_trip_through_split_chunks_is_bit_identical(tmp_path):
  convert.hf_to_orbax(str(TINY_HF), str(tmp_path / "ckpt"), dtype="bfloat16", piece_elements=512)
  convert.orbax_to_hf(
    str(tmp_path / "ckpt"), str(tmp_path / "hf"), piece_elements=700, max_shard_bytes=100_000, workers=3
  )
  src, out = HFCheckpoint(TINY_HF), HFCheckpoint(str(tmp_path / "hf"))
  assert len(set(out.weight_map.values())) > 3
  assert sorted(src.weight_map) == sorted(out.weight_map)
  for name in src.weight_map:
    a, b = src._file(name).get(name), out._file(name).get(name)
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name


def test_each_worker_thread_writes_a_database_of_its_own(tmp_path, reference):
  """Threads write side by side into databases of their own (one per thread that ran, each piece in exactly
  one), and the item's root database references every chunk."""
  out = str(tmp_path / "ckpt")
  convert.hf_to_orbax(str(TINY_HF), out, workers=3, piece_elements=512)
  state = os.path.join(out, "state")
  lanes = orbax_arrays.process_dirs(state, 0)
  assert [os.path.basename(d) for d in lanes] == [f"ocdbt.process_0t{i}" for i in range(len(lanes))]
  assert 2 <= len(lanes) <= 3  # (dozens of pieces: more than one of the three threads takes some)
  ctx = orbax_arrays.context()
  keys = [{k for k in orbax_arrays.list_keys(d, ctx) if not k.endswith("/.zarray")} for d in lanes]
  assert sum(map(len, keys)) == len(set().union(*keys))  # no chunk written twice
  assert set().union(*keys) == {k for k in orbax_arrays.list_keys(state, ctx) if not k.endswith("/.zarray")}
  _, model = load_model(out)
  _assert_equal(flatten(nnx.state(model, nnx.Variable).to_pure_dict()), reference)


def test_orbax_to_hf_skips_complete_shards(tmp_path):
  convert.hf_to_orbax(str(TINY_HF), str(tmp_path / "ckpt"))
  hf = tmp_path / "hf"
  convert.orbax_to_hf(str(tmp_path / "ckpt"), str(hf), max_shard_bytes=100_000)
  shards = sorted(p for p in hf.iterdir() if p.suffix == ".safetensors")
  stamps = {p.name: p.stat().st_mtime_ns for p in shards}
  shards[1].unlink()
  stats = convert.orbax_to_hf(str(tmp_path / "ckpt"), str(hf), max_shard_bytes=100_000)
  assert stats.bytes_written < 100_000 + 1000  # one shard rewritten
  assert {p.name: p.stat().st_mtime_ns for p in shards if p != shards[1]} == {
    k: v for k, v in stamps.items() if k != shards[1].name
  }


def _training_workdir(tmp_path, state):
  """A workdir as kimi_jax.train leaves it: run_config.json + a TrainCheckpointer step holding params/rest."""
  cfg = HFCheckpoint(TINY_HF).config()
  model = abstract_model(cfg)
  _, params, _ = nnx.split(model, nnx.Param, ...)
  flat = flatten(state)
  params = unflatten({path: flat[path] for path in flatten(params.to_pure_dict())})
  rest = {"moe_layers": {"mlp": {"router": {"bias": state["moe_layers"]["mlp"]["router"]["bias"]}}}}
  work = tmp_path / "work"
  ckpt = TrainCheckpointer(str(work), keep=1)
  ckpt.save(3, {"params": params, "rest": rest}, {"count": np.zeros((), np.int32)}, {"pos": 1})
  ckpt.wait()
  ckpt.close()
  (work / RUN_CONFIG_FILE).write_text(json.dumps({"model": cfg.to_dict(), "train": {}}))
  return work, cfg


def test_export_and_init_from_a_training_workdir(tmp_path, reference):
  ckpt = HFCheckpoint(TINY_HF)
  state = load_state(ckpt, ckpt.config(), np.float32)
  work, cfg = _training_workdir(tmp_path, state)
  convert.orbax_to_hf(str(work), str(tmp_path / "hf"))
  out = HFCheckpoint(str(tmp_path / "hf"))
  for name in ckpt.weight_map:
    assert ckpt.read(name).tobytes() == out.read(name).tobytes(), name

  params, rest = init_state_from(str(work), cfg)
  assert set(flatten(rest)) == {("moe_layers", "mlp", "router", "bias")}
  _assert_equal({**flatten(params), **flatten(rest)}, reference)
  params, _ = init_state_from(str(work), cfg.replace(param_dtype="bfloat16"))  # cast on read
  assert flatten(params)[("moe_layers", "mlp", "experts", "gate")].dtype == ml_dtypes.bfloat16


def test_init_state_from_a_converted_checkpoint(tmp_path, reference):
  convert.hf_to_orbax(str(TINY_HF), str(tmp_path / "ckpt"))
  cfg = HFCheckpoint(TINY_HF).config()
  params, rest = init_state_from(str(tmp_path / "ckpt"), cfg)
  model = abstract_model(cfg)
  _, abstract_params, abstract_rest = nnx.split(model, nnx.Param, ...)
  assert jax.tree.structure(params) == jax.tree.structure(abstract_params.to_pure_dict())
  assert jax.tree.structure(rest) == jax.tree.structure(abstract_rest.to_pure_dict())
  _assert_equal({**flatten(params), **flatten(rest)}, reference)
  with pytest.raises(ValueError, match=r"another architecture.*hidden_size: 64 \(checkpoint\) vs 32"):
    restore_state(str(tmp_path / "ckpt"), cfg.replace(hidden_size=32))
