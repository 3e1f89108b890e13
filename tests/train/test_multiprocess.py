"""The multi-host code path on one machine: `launch.local` with 2 processes × 4 CPU devices trains on the same
batches as 1 process × 8 devices (fixed data_shards) and logs the same losses and eval losses, with a NaN step
skipped by the guard in both; SIGTERM to the job saves a checkpoint at one step on both processes, exits 0, and the
same command resumes to the same losses."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

from helpers.paths import REPO, TINY_CONFIG
import pytest

STEPS = 24
NAN_STEP = 3
TRAIN = [
  "-m",
  "kimi_jax.train",
  "--config",
  str(TINY_CONFIG),
  f"--config.steps={STEPS}",
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
  "--config.eval_every=4",
  "--config.eval_split=0.05",
  "--config.eval_batches=2",
  "--config.on_nonfinite=skip",
  f"--config.debug_nan_step={NAN_STEP}",
]
# On a busy machine the two processes can start minutes apart: wait for each other as long as on a pod.
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "KIMI_JOIN_TIMEOUT_SECONDS": "900"}
LAUNCH = [sys.executable, "-m", "launch.local", "--num_processes", "2", "--devices_per_process", "4", "--"]


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def assert_same_run(a, b):
  """Equal steps, skips and (to float32 reduction-order noise) losses and eval losses; NaN where the other has NaN."""
  assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
  assert (
    [r["skipped_steps"] for r in a]
    == [r["skipped_steps"] for r in b]
    == [int(s >= NAN_STEP) for s in range(1, STEPS + 1)]
  )
  for key in ("loss", "eval_loss"):
    x, y = [r.get(key) for r in a], [r.get(key) for r in b]
    assert [v is None for v in x] == [v is None for v in y], key
    for u, v in zip(x, y):
      if u is not None:
        assert (math.isnan(u) and math.isnan(v)) or abs(u - v) <= 1e-5 * abs(u), (key, x, y)
  assert sum(r.get("eval_loss") is not None for r in a) == STEPS // 4


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  work = tmp_path_factory.mktemp("one")
  one = subprocess.run(
    [sys.executable, *TRAIN, "--workdir", str(work)],
    capture_output=True,
    text=True,
    env={**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    cwd=REPO,
  )
  assert one.returncode == 0, one.stderr[-3000:]
  return rows(work)


@pytest.mark.slow
def test_two_processes_match_one(one_process, tmp_path):
  two = subprocess.run([*LAUNCH, *TRAIN, "--workdir", str(tmp_path)], capture_output=True, text=True, env=ENV, cwd=REPO)
  assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
  assert_same_run(rows(tmp_path), one_process)


@pytest.mark.slow
def test_sigterm_to_the_job_saves_on_every_process_and_resumes(one_process, tmp_path):
  log = tmp_path / "preempted.log"
  command = [*LAUNCH, *TRAIN, "--workdir", str(tmp_path / "w")]
  with log.open("w") as out:
    job = subprocess.Popen(command, env=ENV, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while not (tmp_path / "w" / "checkpoints" / "4").is_dir():
      assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
      time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # launch.local passes it to both processes
    assert job.wait(timeout=300) == 0, log.read_text()[-3000:]
  text = log.read_text()
  stopped = int(re.search(r"\[0\] preempted \(SIGTERM\): saved a checkpoint at step (\d+)", text).group(1))
  assert 4 <= stopped < STEPS, "the run finished before it could be preempted"
  rerun = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=REPO)
  assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
  assert f"resuming at step {stopped}" in rerun.stdout
  assert_same_run(rows(tmp_path / "w"), one_process)
