"""Streaming, measured: converting a synthetic ≥ 3 GB K2-layout FP8 checkpoint peaks well below 1 GiB of RSS."""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

from builders.synthetic import k2_shaped, write_synthetic
import ml_dtypes
import numpy as np
import pytest

from kimi_jax.checkpoint import orbax_arrays
from kimi_jax.checkpoint.hf import HFCheckpoint, abstract_state, flatten
from kimi_jax.config import tiny


def peak_rss_of(cmd: list[str]) -> int:
  """Run `cmd` to completion in a fresh measuring process; returns the child's peak RSS in bytes."""
  code = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
  )
  out = subprocess.run(
    [sys.executable, "-c", code, *cmd], capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return int(out.stdout.split()[-1]) * 1024  # KiB on Linux


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int4"])
def test_synthetic_release_converts(fmt, tmp_path):
  """The synthetic writer produces valid releases of each format (small here), which convert exactly."""
  cfg = tiny()
  write_synthetic(str(tmp_path / "hf"), cfg, fmt, max_shard_bytes=1 << 20)
  from kimi_jax.checkpoint.convert import hf_to_orbax

  hf_to_orbax(str(tmp_path / "hf"), str(tmp_path / "ckpt"), dtype="bfloat16")
  ckpt = HFCheckpoint(str(tmp_path / "hf"))
  name = "model.layers.2.mlp.experts.5.down_proj.weight"
  expected = ckpt.read(name, transpose=True, dtype=ml_dtypes.bfloat16)
  ctx = orbax_arrays.context()
  stored = orbax_arrays.open_array(str(tmp_path / "ckpt" / "state"), ("moe_layers", "mlp", "experts", "down"), ctx)
  got = stored[1, 5].read().result()
  assert np.isfinite(expected.astype(np.float32)).all()
  np.testing.assert_array_equal(got, expected)


@pytest.mark.slow
def test_3gb_conversion_peak_rss_below_1gib():
  cfg = k2_shaped(experts_gb=3.0, fmt="fp8")
  largest = max(math.prod(leaf.shape) * 2 for leaf in flatten(abstract_state(cfg)).values())  # as bf16
  work = tempfile.mkdtemp(prefix="kimi_convert_", dir="/tmp")
  try:
    total = write_synthetic(os.path.join(work, "hf"), cfg, "fp8", max_shard_bytes=1 << 30)
    assert total >= 3e9 and largest > 1.5 * 2**30
    out = os.path.join(work, "ckpt")
    rss = peak_rss_of(
      [
        sys.executable,
        "-m",
        "kimi_jax.convert",
        "hf-to-orbax",
        "--hf_dir",
        os.path.join(work, "hf"),
        "--out_dir",
        out,
        "--dtype",
        "bfloat16",
        "--workers",
        "4",
        "--noprogress",
      ]
    )
    print(
      f"converted {total / 1e9:.2f} GB, largest stacked target array {largest / 2**30:.2f} GiB, "
      f"peak RSS {rss / 2**30:.2f} GiB"
    )
    assert rss < 2**30
    with open(os.path.join(out, "conversion.json")) as f:
      assert json.load(f)["complete"]
    ckpt = HFCheckpoint(os.path.join(work, "hf"))
    stored = orbax_arrays.open_array(
      os.path.join(out, "state"), ("moe_layers", "mlp", "experts", "up"), orbax_arrays.context()
    )
    name = f"model.layers.{cfg.num_hidden_layers - 1}.mlp.experts.63.up_proj.weight"
    np.testing.assert_array_equal(
      stored[cfg.num_moe_layers - 1, 63].read().result(), ckpt.read(name, transpose=True, dtype=ml_dtypes.bfloat16)
    )
  finally:
    shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow
def test_conversion_into_a_bucket_peak_rss_below_1gib(gcs):
  """The same streaming into gs:// (tensorstore's gcs driver, the log object rewritten as it goes): RSS stays
  bounded although the ~4 GB bf16 output is far larger than what the process may hold."""
  cfg = k2_shaped(experts_gb=1.5, fmt="fp8")
  bucket = gcs.create_bucket("kimi-jax-memory")
  work = tempfile.mkdtemp(prefix="kimi_convert_", dir="/tmp")
  try:
    total = write_synthetic(os.path.join(work, "hf"), cfg, "fp8", max_shard_bytes=1 << 30)
    url = f"gs://{bucket}/ckpt"
    rss = peak_rss_of(
      [
        sys.executable,
        "-m",
        "kimi_jax.convert",
        "hf-to-orbax",
        "--hf_dir",
        os.path.join(work, "hf"),
        "--out_dir",
        url,
        "--dtype",
        "bfloat16",
        "--workers",
        "4",
        "--noprogress",
      ]
    )
    written = sum(gcs.list_objects(bucket, "ckpt/", sizes=True).values())
    print(
      f"converted {total / 1e9:.2f} GB into {url} ({written / 1e9:.2f} GB of objects), peak RSS {rss / 2**30:.2f} GiB"
    )
    assert written > 3e9 and rss < 2**30
    assert json.loads(gcs.read_object(bucket, "ckpt/conversion.json"))["complete"]
    ckpt = HFCheckpoint(os.path.join(work, "hf"))
    stored = orbax_arrays.open_array(f"{url}/state", ("moe_layers", "mlp", "experts", "up"), orbax_arrays.context())
    name = f"model.layers.{cfg.num_hidden_layers - 1}.mlp.experts.63.up_proj.weight"
    np.testing.assert_array_equal(
      stored[cfg.num_moe_layers - 1, 63].read().result(), ckpt.read(name, transpose=True, dtype=ml_dtypes.bfloat16)
    )
  finally:
    shutil.rmtree(work, ignore_errors=True)
