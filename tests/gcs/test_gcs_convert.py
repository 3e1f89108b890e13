"""Conversion against a real GCS API server on 127.0.0.1 (the `gcs` fixture, tests/helpers/gcs_server.py): hf-to-orbax
from a release in a bucket and into a bucket (one process, two, interrupted and resumed), forward and generate from the
bucket, orbax-to-hf back out of it; each equals its local counterpart bit for bit, and nothing named `gs:` appears on
local disk."""

import json
import os
from pathlib import Path
import subprocess
import sys

from helpers.paths import REFERENCE_DATA, REPO, TINY_HF, TINY_INT4, TINY_K25
import numpy as np
import pytest

BUCKET = "kimi-jax-convert"
HF_FIXTURES = {"tiny_hf": "bfloat16", "tiny_int4": "float32"}  # (tiny_hf is stored in BF16: lossless)


@pytest.fixture(scope="module")
def bucket(gcs):
  return gcs.create_bucket(BUCKET)


@pytest.fixture(scope="module")
def converted_gs(bucket, tmp_path_factory):
  """hf-to-orbax of each fixture into gs://BUCKET/convert/<name>, made once, from a fresh current directory."""
  from kimi_jax.checkpoint import convert

  made = {}

  def get(name):
    if name not in made:
      cwd = os.getcwd()
      os.chdir(tmp_path_factory.mktemp("cwd_convert"))
      try:
        url = f"gs://{bucket}/convert/{name}"
        convert.hf_to_orbax(str(REFERENCE_DATA / name), url, dtype=HF_FIXTURES[name], workers=2)
      finally:
        os.chdir(cwd)
      made[name] = url
    return made[name]

  return get


@pytest.mark.parametrize("name", sorted(HF_FIXTURES))
def test_hf_to_orbax_into_the_bucket_matches_transformers(name, gcs, bucket, converted_gs):
  from flax import nnx
  import jax.numpy as jnp

  from kimi_jax.checkpoint.model_io import load_any

  url = converted_gs(name)
  names = gcs.list_objects(bucket, f"convert/{name}/")
  prefix = f"convert/{name}/"
  assert {
    prefix + "config.json",
    prefix + "conversion.json",
    prefix + "state/_METADATA",
    prefix + "state/manifest.ocdbt",
  } <= set(names)
  assert not [n for n in names if n.endswith(".log") or n.endswith(".tmp")]  # the log is removed once complete
  assert json.loads(gcs.read_object(bucket, prefix + "conversion.json"))["complete"]
  ref = np.load(REFERENCE_DATA / name / "reference.npz")
  _, model = load_any(url, dtype="float32", param_dtype="float32")
  logits = nnx.jit(lambda m, t: m(t)[0])(model, jnp.asarray(ref["tokens"]))
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)


def test_forward_cli_from_the_bucket(converted_gs, tmp_path):
  ref = np.load(TINY_HF / "reference.npz")
  np.save(tmp_path / "t.npy", ref["tokens"])
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the emulator variables come from the `gcs` fixture
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "kimi_jax.forward",
      "--checkpoint",
      converted_gs("tiny_hf"),
      "--tokens",
      str(tmp_path / "t.npy"),
      "--out",
      str(tmp_path / "l.npy"),
      "--dtype",
      "float32",
    ],
    capture_output=True,
    text=True,
    env=env,
    cwd=tmp_path,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  np.testing.assert_allclose(np.load(tmp_path / "l.npy"), ref["logits"], atol=1e-4, rtol=0)
  assert not (tmp_path / "gs:").exists()


def test_orbax_to_hf_from_the_bucket_equals_the_local_round_trip(converted_gs, tmp_path):
  from kimi_jax.checkpoint import convert
  from kimi_jax.checkpoint.hf import HFCheckpoint

  convert.hf_to_orbax(str(TINY_HF), str(tmp_path / "ckpt"), dtype="bfloat16", workers=2)
  convert.orbax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "local"))
  convert.orbax_to_hf(converted_gs("tiny_hf"), str(tmp_path / "from_gs"))
  local, remote = sorted(os.listdir(tmp_path / "local")), sorted(os.listdir(tmp_path / "from_gs"))
  assert local == remote
  for f in local:
    assert (tmp_path / "local" / f).read_bytes() == (tmp_path / "from_gs" / f).read_bytes(), f
  src, out = HFCheckpoint(str(TINY_HF)), HFCheckpoint(str(tmp_path / "from_gs"))
  for n in src.weight_map:  # and the round trip itself is exact
    assert src._file(n).get(n).tobytes() == out._file(n).get(n).tobytes(), n
  with pytest.raises(ValueError, match="gs://x/hf"):
    convert.orbax_to_hf(converted_gs("tiny_hf"), "gs://x/hf")


class Killed(Exception):
  pass


def test_interrupted_conversion_into_the_bucket_resumes(gcs, bucket, monkeypatch, tmp_path):
  """A failure after 20 pieces: the log object in the bucket lists the 19 committed ones, nothing looks complete,
  and the rerun converts exactly the others into a checkpoint that restores like a local conversion."""
  from kimi_jax.checkpoint import convert
  from kimi_jax.checkpoint.hf import HFCheckpoint
  from kimi_jax.checkpoint.model_io import load_any

  monkeypatch.chdir(tmp_path)
  reads, original = [], HFCheckpoint.read
  crash_at = 20

  def failing_read(self, name, rows=None, **kwargs):
    reads.append(name)
    if len(reads) == crash_at:
      raise Killed()
    return original(self, name, rows, **kwargs)

  monkeypatch.setattr(HFCheckpoint, "read", failing_read)
  url, prefix = f"gs://{bucket}/resume", "resume/"
  with pytest.raises(Killed):
    convert.hf_to_orbax(str(TINY_HF), url, workers=1, piece_elements=512)
  names = gcs.list_objects(bucket, prefix)
  assert prefix + "config.json" not in names and prefix + "state/_METADATA" not in names
  assert not json.loads(gcs.read_object(bucket, prefix + "conversion.json"))["complete"]
  logged = gcs.read_object(bucket, prefix + convert.LOG_FILE).decode().splitlines()
  assert len(logged) == crash_at - 1
  with pytest.raises(FileNotFoundError):
    load_any(url)

  reads.clear()
  crash_at = 0
  convert.hf_to_orbax(str(TINY_HF), url, workers=3, piece_elements=512)
  done = len(reads)
  reads.clear()
  convert.hf_to_orbax(str(TINY_HF), str(tmp_path / "local"), workers=3, piece_elements=512)
  assert done == len(reads) - len(logged)  # only the pieces not logged were converted again
  names = gcs.list_objects(bucket, prefix)
  assert prefix + "config.json" in names and prefix + convert.LOG_FILE not in names
  _assert_same_state(url, str(tmp_path / "local"))
  reads.clear()
  convert.hf_to_orbax(str(TINY_HF), url, workers=3, piece_elements=512)  # complete: nothing to do
  assert not reads
  assert not (tmp_path / "gs:").exists()


def _assert_same_state(a, b):
  """The checkpoints (URLs or paths) restore to the same arrays, bit for bit."""
  from flax import nnx

  from kimi_jax.checkpoint.hf import flatten
  from kimi_jax.checkpoint.model_io import load_any

  (cfg_a, got), (cfg_b, want) = load_any(a), load_any(b)
  assert cfg_a == cfg_b
  got, want = (flatten(nnx.state(m, nnx.Variable).to_pure_dict()) for m in (got, want))
  assert got.keys() == want.keys()
  for path in want:
    x, y = np.asarray(got[path]), np.asarray(want[path])
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), path


def test_killed_conversion_into_the_bucket_resumes_from_the_periodic_log(gcs, bucket, monkeypatch, tmp_path):
  """As if SIGKILLed: no final flush, so only the log versions uploaded while converting survive; the rerun
  redoes the rest (rewriting identical chunks) and the checkpoint equals a local conversion."""
  from kimi_jax.checkpoint import convert
  from kimi_jax.checkpoint.hf import HFCheckpoint

  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(convert, "LOG_FLUSH_SECONDS", 0.0)
  original_read, original_exit = HFCheckpoint.read, convert.PieceLog.__exit__
  reads = []

  def failing_read(self, name, rows=None, **kwargs):
    reads.append(name)
    if len(reads) == 30:
      raise Killed()
    return original_read(self, name, rows, **kwargs)

  monkeypatch.setattr(HFCheckpoint, "read", failing_read)
  monkeypatch.setattr(convert.PieceLog, "__exit__", lambda self, *exc: None)  # a kill runs no cleanup
  url, prefix = f"gs://{bucket}/killed-convert", "killed-convert/"
  with pytest.raises(Killed):
    convert.hf_to_orbax(str(TINY_HF), url, workers=1, piece_elements=512)
  logged = gcs.read_object(bucket, prefix + convert.LOG_FILE).decode().splitlines()
  assert 0 < len(logged) <= 29 and len(set(logged)) == len(logged)
  monkeypatch.setattr(HFCheckpoint, "read", original_read)
  monkeypatch.setattr(convert.PieceLog, "__exit__", original_exit)
  convert.hf_to_orbax(str(TINY_HF), url, workers=2, piece_elements=512)
  convert.hf_to_orbax(str(TINY_HF), str(tmp_path / "local"), workers=2, piece_elements=512)
  _assert_same_state(url, str(tmp_path / "local"))


def test_two_processes_into_the_bucket_equal_one_local_process(gcs, bucket, tmp_path, monkeypatch):
  """The shares run one after another here (process 0 last, finding process 1's done marker), as in
  test_convert_multiprocess: per-process databases under state/, merged by process 0, all objects."""
  from kimi_jax.checkpoint import convert

  monkeypatch.chdir(tmp_path)
  url, prefix, fixture = f"gs://{bucket}/two", "two/", str(TINY_INT4)
  for i in (1, 0):
    convert.hf_to_orbax(fixture, url, piece_elements=512, process_index=i, process_count=2, wait_timeout=0)
  names = gcs.list_objects(bucket, prefix)
  assert any(n.startswith(prefix + "state/ocdbt.process_1t0/") for n in names)
  assert not [n for n in names if n.endswith((".log", ".done"))]
  convert.hf_to_orbax(fixture, str(tmp_path / "local"), piece_elements=512)
  _assert_same_state(url, str(tmp_path / "local"))


def test_two_concurrent_processes_into_the_bucket(bucket, tmp_path):
  """`python -m launch.local --num_processes 2 -- -m kimi_jax.convert hf-to-orbax --out_dir gs://...`: process 0
  finds process 1's log and marker although it listed the directory before they existed (gcsfs caches listings)."""
  url = f"gs://{bucket}/concurrent"
  env = {k: v for k, v in os.environ.items() if not k.startswith("KIMI_")}  # the emulator variables pass through
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.local",
      "--num_processes",
      "2",
      "--",
      "-m",
      "kimi_jax.convert",
      "hf-to-orbax",
      "--hf_dir",
      str(TINY_INT4),
      "--out_dir",
      url,
      "--noprogress",
      "--workers",
      "2",
    ],
    check=False,
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  assert "[0] hf-to-orbax: process 0 of 2 finished the checkpoint" in result.stdout
  from kimi_jax.checkpoint import convert

  convert.hf_to_orbax(str(TINY_INT4), str(tmp_path / "local"))
  _assert_same_state(url, str(tmp_path / "local"))
  assert not (REPO / "gs:").exists()


def test_k25_round_trip_from_the_bucket_keeps_the_wrapper(bucket, tmp_path, monkeypatch):
  """hf_wrapper.json is read from the bucket: orbax-to-hf --layout k25 from gs:// equals the local export."""
  from kimi_jax.checkpoint import convert

  monkeypatch.chdir(tmp_path)
  url, fixture = f"gs://{bucket}/k25", str(TINY_K25)
  convert.hf_to_orbax(fixture, url, dtype="bfloat16")
  convert.hf_to_orbax(fixture, str(tmp_path / "ckpt"), dtype="bfloat16")
  convert.orbax_to_hf(url, str(tmp_path / "from_gs"), layout="k25")
  convert.orbax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "local"), layout="k25")
  files = sorted(os.listdir(tmp_path / "local"))
  assert files == sorted(os.listdir(tmp_path / "from_gs"))
  assert "vision_config" in json.loads((tmp_path / "from_gs" / "config.json").read_text())
  for f in files:
    assert (tmp_path / "local" / f).read_bytes() == (tmp_path / "from_gs" / f).read_bytes(), f


# A release read from the bucket (--hf_dir gs://), and generate from a converted checkpoint there ----------------


def upload(local: Path, url: str) -> str:
  """Copies a local directory's files to gs:// (as `gcloud storage cp -r` would)."""
  import fsspec

  fs = fsspec.filesystem("gs")
  for f in sorted(local.iterdir()):
    fs.put_file(str(f), f"{url}/{f.name}")
  return url


@pytest.mark.parametrize("name", ["tiny_int4", "tiny_k25"])
def test_a_release_in_the_bucket_converts_like_the_local_one(name, bucket, tmp_path, monkeypatch):
  """--hf_dir gs://: shards are read by byte ranges (INT4 packing and scales, K2.5's wrapper and vision tensors);
  the checkpoint equals the one converted from the local copy, bit for bit."""
  from kimi_jax.checkpoint import convert
  from kimi_jax.checkpoint.hf import HFCheckpoint

  monkeypatch.chdir(tmp_path)
  release = upload(REFERENCE_DATA / name, f"gs://{bucket}/releases/{name}")
  remote, local = HFCheckpoint(release), HFCheckpoint(str(REFERENCE_DATA / name))
  assert remote.weight_map == local.weight_map and remote.skipped == local.skipped
  for n in local.weight_map:
    assert remote._file(n).get(n).tobytes() == local._file(n).get(n).tobytes(), n
  dtype = "bfloat16"
  convert.hf_to_orbax(release, f"gs://{bucket}/from-release/{name}", dtype=dtype, workers=3, piece_elements=512)
  convert.hf_to_orbax(str(REFERENCE_DATA / name), str(tmp_path / "local"), dtype=dtype, workers=3, piece_elements=512)
  _assert_same_state(f"gs://{bucket}/from-release/{name}", str(tmp_path / "local"))
  assert not (tmp_path / "gs:").exists()


def test_a_missing_release_in_the_bucket_is_named(bucket):
  from kimi_jax.checkpoint import convert
  from kimi_jax.checkpoint.hf import CheckpointError

  with pytest.raises(CheckpointError, match=f"gs://{bucket}/releases/none: no config.json"):
    convert.hf_to_orbax(f"gs://{bucket}/releases/none", f"gs://{bucket}/never")
  with pytest.raises(FileNotFoundError, match="gs://kimi-jax-no-such-bucket/k2: bucket gs://kimi-jax-no-such-bucket"):
    convert.hf_to_orbax("gs://kimi-jax-no-such-bucket/k2", f"gs://{bucket}/never")


def test_generate_cli_from_the_bucket(converted_gs, tmp_path):
  """`python -m kimi_jax.generate --checkpoint gs://...` decodes transformers' greedy tokens."""
  want = np.load(TINY_HF / "generate.npz")
  np.save(tmp_path / "prompts.npy", want["prompts"])  # [3, 12], rows right-padded with -1
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the emulator variables come from the `gcs` fixture
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "kimi_jax.generate",
      "--checkpoint",
      converted_gs("tiny_hf"),
      "--prompt_tokens",
      str(tmp_path / "prompts.npy"),
      "--max_new_tokens",
      "24",
      "--dtype",
      "float32",
      "--out",
      str(tmp_path / "out.npy"),
    ],
    capture_output=True,
    text=True,
    env=env,
    cwd=tmp_path,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  got = np.load(tmp_path / "out.npy")
  for row, tokens in enumerate(want["tokens"]):  # the fixture's EOS (2) is the default stop token
    tokens = [t for t in tokens.tolist() if t >= 0]
    assert [t for t in got[row].tolist() if t >= 0] == (tokens[:-1] if tokens[-1] == 2 else tokens), row
  assert not (tmp_path / "gs:").exists()
