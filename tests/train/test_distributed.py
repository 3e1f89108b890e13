"""kimi_jax.distributed start-up under skew: two real CPU processes that start apart still join, and a job whose
other process never comes fails within KIMI_JOIN_TIMEOUT_SECONDS with one message naming it."""

import subprocess
import sys
import time

from helpers.paths import REPO, python_path_env
import jax
import pytest

from kimi_jax import distributed
from launch import local

JOIN = """
from kimi_jax import distributed
assert distributed.initialize()
import jax
from jax.experimental import multihost_utils
ids = multihost_utils.process_allgather(jax.numpy.int32(jax.process_index()))  # a cross-process collective
print("joined", jax.process_index(), jax.process_count(), jax.device_count(), sorted(ids.tolist()), flush=True)
"""


def _start(process_id: int, port: int, **env: str) -> subprocess.Popen:
  """Process `process_id` of 2 (2 CPU devices each), with the environment launch.local gives it."""
  base = {k: v for k, v in python_path_env().items() if not k.startswith("KIMI_")}
  return subprocess.Popen(
    [sys.executable, "-c", JOIN],
    env=local.process_env({**base, **env}, process_id, 2, 2, port),
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _finish(process: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
  try:
    out, err = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    out, err = process.communicate()
    pytest.fail(f"still running after {timeout} s:\n{out}\n{err[-3000:]}")
  return process.returncode, out, err


def _join_late(delay: float, timeout: float) -> None:
  port = local._free_port()
  first = _start(0, port)
  try:
    time.sleep(delay)
    second = _start(1, port)
    results = [_finish(p, timeout) for p in (second, first)]
  finally:
    first.kill()
  for i, (rc, out, err) in zip((1, 0), results):
    assert rc == 0, f"process {i}: {out}\n{err[-3000:]}"
    assert f"joined {i} 2 4 [0, 1]" in out, out


def test_process_started_late_still_joins():
  _join_late(delay=25, timeout=240)


@pytest.mark.slow
def test_process_started_150_s_late_still_joins():
  # The case. (JAX's own connect deadline is 300 s; the join waits KIMI_JOIN_TIMEOUT_SECONDS, 900 by default.)
  _join_late(delay=150, timeout=420)


@pytest.mark.parametrize("present", [0, 1])
def test_process_that_never_starts_is_named(present):
  start = time.monotonic()
  rc, out, err = _finish(_start(present, local._free_port(), KIMI_JOIN_TIMEOUT_SECONDS="10"), timeout=120)
  elapsed = time.monotonic() - start
  absent = 1 - present
  assert rc == distributed.JOIN_FAILED_STATUS, err[-3000:]
  assert f"process {absent} never arrived" in err, err[-3000:]
  assert f"process {present} waited 10 s (KIMI_JOIN_TIMEOUT_SECONDS)" in err, err
  assert "127.0.0.1:" in err and "for 2 processes to join" in err, err
  assert elapsed < 90, elapsed  # the deadline, not JAX's (10 + 30 s) nor a hang


def test_join_timeout_from_environment():
  assert distributed.join_timeout({}) == distributed.DEFAULT_JOIN_TIMEOUT_SECONDS == 900
  assert distributed.join_timeout({"KIMI_JOIN_TIMEOUT_SECONDS": "1800"}) == 1800
  for bad in ("0", "-5", "ten", "1.5"):
    with pytest.raises(ValueError, match="KIMI_JOIN_TIMEOUT_SECONDS"):
      distributed.join_timeout({"KIMI_JOIN_TIMEOUT_SECONDS": bad})


def test_topology_timeout_names_the_late_process(monkeypatch):
  """The failure that started this: process 1 connected, then took longer than the topology exchange allows."""

  def fail(**kwargs):
    assert kwargs["initialization_timeout"] == 60 + 30
    raise jax.errors.JaxRuntimeError(
      "INTERNAL: Getting local topologies failed: Error 1: GetKeyValue() timed out with key: "
      "cpu:local_topology/cpu/1 and duration: 2m"
    )

  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", fail)
  env = {"KIMI_COORDINATOR": "10.0.0.1:1234", "KIMI_NUM_PROCESSES": "4", "KIMI_PROCESS_ID": "0"}
  with pytest.raises(distributed.JoinError) as error:
    distributed.initialize({**env, "KIMI_JOIN_TIMEOUT_SECONDS": "60"})
  message = str(error.value)
  assert "process 1 never arrived" in message
  assert "process 0 waited 60 s (KIMI_JOIN_TIMEOUT_SECONDS) at coordinator 10.0.0.1:1234 for 4 processes" in message
  assert "GetKeyValue() timed out" in message


def test_failure_message_for_a_larger_job():
  message = distributed.join_failure_message(
    process_id=3, num_processes=8, coordinator="h:1", timeout=900, coordinator_up=False
  )
  assert "process 0 (the coordinator, h:1) never came up" in message
  assert "raise KIMI_JOIN_TIMEOUT_SECONDS" in message
  message = distributed.join_failure_message(process_id=0, num_processes=8, coordinator="h:1", timeout=900)
  assert "not all of the other 7 arrived" in message
