"""The multi-host code path on one machine: `launch.local` with 2 processes × 4 CPU devices trains on the
same batches as 1 process × 8 devices (fixed data_shards) and logs the same losses."""

import json
import os
import subprocess
import sys

from helpers.paths import REPO, TINY_CONFIG
import pytest

TRAIN = [
  "-m",
  "kimi_jax.train",
  "--config",
  str(TINY_CONFIG),
  "--config.steps=4",
  "--config.log_every=1",
  "--config.checkpoint_every=4",
  "--config.sample_tokens=0",
  "--config.batch_size=8",
  "--config.seq_len=32",
  "--config.data_shards=2",
  "--config.mesh=fsdp=2,expert=4",
  "--config.model.dtype=float32",
  "--config.model.hidden_size=64",
  "--config.model.num_hidden_layers=2",
]


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  # On a busy machine the two processes can start minutes apart: wait for each other as long as on a pod.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "KIMI_JOIN_TIMEOUT_SECONDS": "900"}
  one = subprocess.run(
    [sys.executable, *TRAIN, "--workdir", str(tmp_path / "one")],
    capture_output=True,
    text=True,
    env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    cwd=REPO,
  )
  assert one.returncode == 0, one.stderr[-3000:]
  two = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.local",
      "--num_processes",
      "2",
      "--devices_per_process",
      "4",
      "--",
      *TRAIN,
      "--workdir",
      str(tmp_path / "two"),
    ],
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
  )
  assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
  a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
  assert len(a) == len(b) == 4
  assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)
