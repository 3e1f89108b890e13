"""Training checkpoints: retention (keep-last-N plus keep-every-K), and exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

from helpers.paths import TINY_CONFIG
from helpers.train import SMALL_MODEL
import numpy as np
import pytest

from kimi_jax.checkpoint.manager import TrainCheckpointer


def test_keeps_the_last_n_and_every_kth(tmp_path):
  ckpt = TrainCheckpointer(str(tmp_path), keep=2, keep_period=4)
  for step in range(1, 11):
    ckpt.save(step, {"w": np.full(3, step, np.float32)}, {"m": np.zeros(3, np.float32)}, {"pos": step})
  ckpt.wait()
  assert ckpt.all_steps() == [4, 8, 9, 10]
  ckpt.close()
  assert TrainCheckpointer(str(tmp_path), keep=2).latest_step() == 10


def train_command(workdir, steps):
  overrides = dict(
    steps=steps,
    batch_size=4,
    seq_len=32,
    learning_rate=1e-2,
    warmup_steps=2,
    log_every=1,
    checkpoint_every=5,
    sample_tokens=0,
    **{f"model.{k}": v for k, v in SMALL_MODEL.items()},
  )
  return [
    sys.executable,
    "-m",
    "kimi_jax.train",
    "--config",
    str(TINY_CONFIG),
    "--workdir",
    str(workdir),
    *(f"--config.{k}={v}" for k, v in overrides.items()),
  ]


def losses(workdir):
  """{step: loss}, the last row for each step (a resumed run re-logs the steps after its checkpoint)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f)}


def committed_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_logs_the_uninterrupted_losses(tmp_path):
  steps = 60
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  full = subprocess.run(train_command(tmp_path / "full", steps), capture_output=True, text=True, env=env)
  assert full.returncode == 0, full.stderr[-3000:]

  work = tmp_path / "killed"
  proc = subprocess.Popen(train_command(work, steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
  deadline = time.time() + 300
  while not [s for s in committed_steps(work) if s >= 10] and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
  resumed_from = max(committed_steps(work))
  assert 10 <= resumed_from < steps

  rerun = subprocess.run(train_command(work, steps), capture_output=True, text=True, env=env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resuming at step {resumed_from}" in rerun.stdout
  expected, got = losses(tmp_path / "full"), losses(work)
  assert sorted(got) == list(range(1, steps + 1))
  assert got == expected
