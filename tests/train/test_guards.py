"""Training guards: a NaN/inf step stops the run before any checkpoint after it (on_nonfinite="stop") or is skipped
with the state unchanged ("skip"); SIGTERM saves a checkpoint at the step in flight, exits 0, and the same command
resumes exactly."""

import os
import random
import re
import signal
import subprocess
import time
import warnings

from helpers.train import child_env, read_metrics, small_config, small_config_file, train_command
import numpy as np
import pytest

from kimi_jax.train import train
from kimi_jax.training.guards import NonFiniteError

NAN_STEP = 5


pytestmark = pytest.mark.usefixtures("compilation_cache")


def committed_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def saved_arrays(workdir, step):
  """The checkpoint's params + router biases and optimizer state, as flat lists of numpy arrays."""
  import jax
  import orbax.checkpoint as ocp

  with ocp.PyTreeCheckpointer() as ckpt, warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Sharding info not provided")  # one device: the saved sharding is right
    return [
      np.asarray(a)
      for item in ("state", "opt_state")
      for a in jax.tree.leaves(ckpt.restore(os.path.join(workdir, "checkpoints", str(step), item)))
    ]


def test_nan_step_stops_naming_the_step_and_a_parameter(tmp_path):
  c = small_config(8)
  c.update(debug_nan_step=NAN_STEP, checkpoint_every=2, log_every=3)  # found at the save of step 6
  with pytest.raises(NonFiniteError, match=rf"step {NAN_STEP}\b.*first non-finite gradient: \w+(/\w+)+") as e:
    train(c, str(tmp_path))
  assert "loss=nan" in str(e.value)
  assert committed_steps(tmp_path) == [2, 4]  # nothing at or after the bad step
  assert all(r["step"] < NAN_STEP and np.isfinite(r["loss"]) for r in read_metrics(tmp_path))


def test_nan_step_is_skipped_with_the_state_unchanged(tmp_path):
  before = signal.getsignal(signal.SIGTERM)
  c = small_config(8)
  c.update(debug_nan_step=NAN_STEP, on_nonfinite="skip", checkpoint_every=1, keep_checkpoints=10)
  last = train(c, str(tmp_path))
  assert signal.getsignal(signal.SIGTERM) is before  # the preemption handler is removed again
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert [r["skipped_steps"] for r in rows] == [int(r["step"] >= NAN_STEP) for r in rows]
  assert np.isnan(rows[NAN_STEP - 1]["loss"])
  assert all(np.isfinite(r["loss"]) for r in rows if r["step"] != NAN_STEP)
  assert np.isfinite(last["loss"]) and rows[-1]["loss"] < rows[0]["loss"]
  # Params, router biases and optimizer state (its step count included) after the bad step are those before it.
  for got, want in zip(saved_arrays(tmp_path, NAN_STEP), saved_arrays(tmp_path, NAN_STEP - 1), strict=True):
    np.testing.assert_array_equal(got, want)
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(saved_arrays(tmp_path, NAN_STEP + 1), saved_arrays(tmp_path, NAN_STEP), strict=True)
  )


STEPS = 200


def test_sigterm_saves_at_the_step_in_flight_and_resumes_exactly(tmp_path, compilation_cache):
  config = small_config_file(tmp_path / "config.py", STEPS, checkpoint_every=10)
  env = child_env(compilation_cache)
  command = lambda work: train_command(config, work)

  work = tmp_path / "preempted"
  log = tmp_path / "preempted.log"  # a file, not a pipe: nobody reads a pipe while we poll
  with log.open("w") as out:
    process = subprocess.Popen(command(work), env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not committed_steps(work):
      assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
      time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.3))  # somewhere after the first checkpoint
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0, log.read_text()[-3000:]  # config.preemption_grace_seconds
  assert time.monotonic() - sent < 30
  stopped = int(re.search(r"saved a checkpoint at step (\d+)", log.read_text()).group(1))
  assert 10 <= stopped < STEPS, "the run finished before it could be preempted"
  assert max(committed_steps(work)) == stopped

  rerun = subprocess.run(command(work), env=env, capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resuming at step {stopped}" in rerun.stdout

  full = tmp_path / "full"
  c = small_config(STEPS)
  c.update(checkpoint_every=10)
  train(c, str(full))
  expected = {r["step"]: r["loss"] for r in read_metrics(full)}
  got = {r["step"]: r["loss"] for r in read_metrics(work)}  # the last row per step
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=0, atol=1e-6)
