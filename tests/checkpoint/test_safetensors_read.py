"""Reading safetensors row blocks: large reads bypass the page cache (O_DIRECT) and must return exactly the bytes
that plain reads return, wherever the tensor and the block start and end relative to the disk's blocks."""

import errno
import os

import ml_dtypes
import numpy as np
import pytest

from kimi_jax.checkpoint import safetensors


@pytest.fixture
def shard(tmp_path, monkeypatch):
  """A shard whose tensors start at offsets that are not multiples of 4096 (nor, for `odd`, of 4), the last
  ending at the end of the file mid-block; reads of 64 KiB and more go direct."""
  monkeypatch.setattr(safetensors, "DIRECT_MIN_BYTES", 1 << 16)
  rng = np.random.default_rng(0)
  tensors = {
    "odd": rng.integers(0, 256, (3,), dtype=np.uint8),
    "f32": rng.standard_normal((300, 257)).astype(np.float32),
    "bf16": rng.standard_normal((1001, 129)).astype(ml_dtypes.bfloat16),
    "fp8": rng.integers(0, 126, (517, 999), dtype=np.uint8).view(ml_dtypes.float8_e4m3fn),
  }
  path = str(tmp_path / "model.safetensors")
  safetensors.write(path, tensors)
  assert os.path.getsize(path) % 4096
  return path, tensors


@pytest.mark.parametrize("name,rows", [("f32", None), ("f32", (17, 299)), ("bf16", (1, 1000)), ("fp8", (5, 517))])
def test_direct_reads_equal_the_bytes(shard, name, rows):
  path, tensors = shard
  f = safetensors.SafetensorsFile(path)
  got = f.get(name, rows)
  want = tensors[name] if rows is None else tensors[name][rows[0] : rows[1]]
  assert got.dtype == want.dtype and got.shape == want.shape
  assert got.tobytes() == want.tobytes()
  if f._bytes._direct_fd is None:
    pytest.skip(f"{path}: this file system refuses O_DIRECT, so only the page-cache path ran")
  got[...] = 0  # a fresh, writable array
  assert f.get(name, rows).tobytes() == want.tobytes()


def test_file_systems_without_direct_io_read_through_the_page_cache(shard, monkeypatch):
  path, tensors = shard
  real_open = os.open

  def no_direct(p, flags, *args):
    if flags & os.O_DIRECT:
      raise OSError(errno.EINVAL, "Invalid argument", p)
    return real_open(p, flags, *args)

  monkeypatch.setattr(os, "open", no_direct)
  f = safetensors.SafetensorsFile(path)
  assert f.get("f32", (3, 200)).tobytes() == tensors["f32"][3:200].tobytes()
  assert f._bytes._direct_fd is None and not f._bytes._direct_ok


def test_truncated_tensor_is_named_on_the_direct_path(shard):
  path, _ = shard
  f = safetensors.SafetensorsFile(path)
  os.truncate(path, os.path.getsize(path) - 5000)  # after the header was checked: the data is gone under us
  with pytest.raises(safetensors.SafetensorsError, match="unexpected end of file"):
    f.get("fp8")


@pytest.mark.parametrize("fixture", ["TINY_HF", "TINY_FP8", "TINY_INT4"])
def test_conversions_through_direct_reads_are_bit_identical(fixture, tmp_path, monkeypatch):
  """The fixtures' tensors are below the 1 MiB threshold: with it lowered to one byte every tensor read goes
  direct (BF16 weights, FP8 codes and scales, INT4 words and scales), and the checkpoint equals the one made
  through the page cache."""
  from helpers import paths

  from kimi_jax.checkpoint import convert, orbax_arrays

  source = str(getattr(paths, fixture))
  direct = []
  read_direct = safetensors._LocalBytes.read_direct

  def counting(self, offset, n):
    out = read_direct(self, offset, n)
    direct.append(out is not None)
    return out

  monkeypatch.setattr(safetensors._LocalBytes, "read_direct", counting)
  outs = {}
  for name, threshold in (("direct", 1), ("cached", 1 << 62)):
    monkeypatch.setattr(safetensors, "DIRECT_MIN_BYTES", threshold)
    outs[name] = str(tmp_path / name / "state")
    convert.hf_to_orbax(source, str(tmp_path / name), dtype="bfloat16", piece_elements=512)
    if name == "direct" and not any(direct):
      pytest.skip(f"{tmp_path}: this file system refuses O_DIRECT, so only the page-cache path ran")
  assert len(direct) > 10
  ctx = orbax_arrays.context()
  paths_ = orbax_arrays.read_tree_paths(outs["direct"])
  assert sorted(paths_) == sorted(orbax_arrays.read_tree_paths(outs["cached"]))
  for path in paths_:
    a, b = (orbax_arrays.open_array(outs[k], path, ctx).read().result() for k in ("direct", "cached"))
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), ".".join(path)
