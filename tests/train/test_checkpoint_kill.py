"""SIGKILL during an asynchronous checkpoint save (kimi_jax/checkpoint/manager.py): the previous checkpoint stays
usable, the half-written one is ignored, and the same command resumes from the previous one, its losses equal to
an uninterrupted run's.

Orbax (0.12) writes step N to WORKDIR/checkpoints/N.orbax-checkpoint-tmp and renames it to N when the save is
complete (orbax/checkpoint/_src/path/atomicity.py, `_get_tmp_directory`). A kill in between leaves that directory
behind: CheckpointManager never lists it as a step and, with cleanup_tmp_directories off (the default), leaves it
alone when opened; the resumed run's own save of step N removes it before writing afresh (`_create_tmp_directory`,
which logs "Removing existing directory since it is not finalized")."""

import os
import random
import subprocess
import time

from helpers.train import child_env, read_metrics, small_config, small_config_file, train_command
import numpy as np
import pytest

from kimi_jax.train import train

STEPS = 40
EVERY = 4  # checkpoint_every
ATTEMPTS = 5
TMP = ".orbax-checkpoint-tmp"  # orbax/checkpoint/_src/path/atomicity_types.py: TMP_DIR_SUFFIX


pytestmark = pytest.mark.usefixtures("compilation_cache")


def config():
  c = small_config(STEPS)
  c.update(checkpoint_every=EVERY)
  return c


def listing(workdir):
  """(committed steps, steps with a temporary directory) under WORKDIR/checkpoints."""
  try:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
  except FileNotFoundError:
    return [], []
  committed = sorted(int(n) for n in names if n.isdigit())
  tmp = sorted(int(n[: -len(TMP)]) for n in names if n.endswith(TMP) and n[: -len(TMP)].isdigit())
  return committed, tmp


def kill_during_a_save(command, env, work, log, after):
  """Starts the run and SIGKILLs it while the save of a step past `after` is in its temporary directory, once a
  checkpoint is committed. Returns that step, or None when the save was finished by the time the kill landed."""
  tail = lambda: log.read_text()[-3000:]
  with log.open("w") as out:  # a file, not a pipe: nobody reads a pipe while we poll
    process = subprocess.Popen(command(work), env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 300
      while True:
        assert process.poll() is None, f"the run ended before the kill (exit {process.returncode}):\n{tail()}"
        assert time.monotonic() < deadline, tail()
        committed, tmp = listing(work)
        if committed and any(s > after for s in tmp):
          break
        time.sleep(0.002)
      time.sleep(random.uniform(0.0, 0.05))  # somewhere into the save
      process.kill()  # SIGKILL: no handler, no cleanup
    finally:
      process.kill()
      process.wait(timeout=60)
  committed, tmp = listing(work)
  if not tmp:  # the rename happened before the kill
    return None
  (half,) = tmp
  return half


def test_sigkill_during_an_async_save_resumes_from_the_previous_checkpoint(tmp_path, compilation_cache):
  from kimi_jax.checkpoint.manager import TrainCheckpointer

  path = small_config_file(tmp_path / "config.py", STEPS, checkpoint_every=EVERY)
  env = child_env(compilation_cache)
  command = lambda work: train_command(path, work)

  # Kill during one of the saves of the first half of the run (each attempt a fresh workdir); a miss (the save
  # renamed before the kill landed) is retried.
  after = random.choice(range(0, STEPS // 2, EVERY))
  for attempt in range(ATTEMPTS):
    work, log = tmp_path / f"killed{attempt}", tmp_path / f"killed{attempt}.log"
    half = kill_during_a_save(command, env, work, log, after)
    if half is not None:
      break
  else:
    pytest.fail(f"in {ATTEMPTS} attempts, no SIGKILL landed while a checkpoint was being written")

  # The half-written step is on disk but no checkpoint; the one before it is committed and is the latest (Orbax
  # finishes a save before it starts the next).
  previous = half - EVERY
  half_written = work / "checkpoints" / f"{half}{TMP}"
  assert half_written.is_dir() and os.listdir(half_written)
  committed, _ = listing(work)
  assert half not in committed and max(committed) == previous, committed
  ckpt = TrainCheckpointer(str(work), keep=3)
  try:
    assert ckpt.latest_step() == previous and half not in ckpt.all_steps()
  finally:
    ckpt.close()
  assert half_written.is_dir()  # opening the manager leaves it (cleanup_tmp_directories is off)

  rerun = subprocess.run(command(work), env=env, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resuming at step {previous}," in rerun.stdout, rerun.stdout[-3000:]
  # The resumed run's own save of that step replaced the stale directory and committed it.
  assert not half_written.exists()
  committed, tmp = listing(work)
  assert tmp == [] and committed == list(range(STEPS - 2 * EVERY, STEPS + 1, EVERY))  # keep_checkpoints=3

  full = tmp_path / "full"
  train(config(), str(full))
  expected = read_metrics(full)
  got = read_metrics(work)  # rows the killed run logged past `previous` were dropped and logged again
  assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in expected], rtol=0, atol=1e-6)
