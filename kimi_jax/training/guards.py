"""What keeps a long run safe, each driven by the loop in kimi_jax/train.py:

NonFiniteGuard   a NaN/inf loss or gradient norm (config.on_nonfinite): stop naming the step and the first
                 non-finite parameter, before any checkpoint holding it; or count the steps the train step skipped
Preemption       SIGTERM: finish the step in flight, save there, exit 0 (config.preemption_grace_seconds)
Profiler         config.profile_steps = "START:END": a jax.profiler trace of those steps in WORKDIR/profile
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import tempfile
import threading
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from kimi_jax.checkpoint.workdir import Workdir
from kimi_jax.training.step import FINITE_KEY, GRAD_LEAF_FINITE_KEY

# The key the cumulative skipped-step count is kept under in a checkpoint's data state.
SKIPPED_STEPS_KEY = "skipped_steps"


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """config.profile_steps "START:END" -> (START, END), 1 <= START <= END; "" -> None."""
  if not spec:
    return None
  try:
    first, last = (int(part) for part in spec.split(":"))
  except ValueError:
    first = last = 0
  if not 1 <= first <= last:
    raise ValueError(f"config.profile_steps must be 'START:END' with 1 <= START <= END, got {spec!r}")
  return first, last


class Profiler:
  """config.profile_steps: a `jax.profiler` trace of steps START..END under WORKDIR/profile, which TensorBoard's
  profile plugin and XProf read. The profiler writes local files only, so for a bucket it traces into a local
  temporary directory and copies the files up when the trace stops. Nothing is traced when unset."""

  def __init__(self, spec: str, wd: Workdir):
    self.steps = parse_profile_steps(spec)
    self._wd, self._local, self._active = wd, None, False

  def before(self, step: int) -> None:
    if self.steps is None or step != self.steps[0]:
      return
    self._local = tempfile.mkdtemp(prefix="kimi-jax-profile-") if self._wd.remote else os.fspath(self._wd.profile)
    jax.profiler.start_trace(self._local)
    self._active = True

  def after(self, step: int, metrics: Any) -> None:
    if self._active and step == self.steps[1]:
      jax.block_until_ready(metrics)  # the trace holds the steps' device work, not just their dispatch
      self.stop()

  def stop(self) -> None:
    if not self._active:
      return
    jax.profiler.stop_trace()
    self._active = False
    if self._wd.remote:
      for path in sorted(pathlib.Path(self._local).rglob("*")):
        if path.is_file():
          target = self._wd.profile / path.relative_to(self._local).as_posix()
          target.parent.mkdir(parents=True, exist_ok=True)
          target.write_bytes(path.read_bytes())
      shutil.rmtree(self._local, ignore_errors=True)


class NonFiniteError(FloatingPointError):
  """config.on_nonfinite="stop": a step's loss or gradient norm was NaN or infinite."""


class NonFiniteGuard:
  """Collects each step's device-side finite flags (no host sync) and reads them in one transfer when the loop
  syncs anyway: with the logged metrics and before a checkpoint save.

  "stop": `check` raises NonFiniteError naming the first bad step and the first parameter whose gradient is
  non-finite there. "skip": the step already left the state unchanged; `check` counts the skipped steps.
  """

  def __init__(self, action: str, params: dict, skipped: int = 0):
    self.action = action
    self.skipped = skipped  # cumulative over the run, resumes included
    self._paths = [
      "/".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)
    ]
    self._pending: list[tuple[int, dict]] = []

  def add(self, step: int, metrics: dict) -> None:
    """Keeps step `step`'s flags (popped from `metrics`, so they are not logged)."""
    flags = {k: metrics.pop(k) for k in (FINITE_KEY, GRAD_LEAF_FINITE_KEY)}
    self._pending.append((step, {**flags, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}))

  def check(self) -> None:
    """Reads the flags of the steps since the last check; raises (stop) or counts them (skip)."""
    pending, self._pending = self._pending, []
    if not pending:
      return
    flags = jax.device_get([f[FINITE_KEY] for _, f in pending])
    bad = [(step, f) for (step, f), ok in zip(pending, flags) if not ok]
    if not bad:
      return
    if self.action == "skip":
      self.skipped += len(bad)
      logging.warning("skipped %d step(s) with a non-finite loss or gradient norm: %s", len(bad), [s for s, _ in bad])
      return
    step, f = bad[0]
    leaf_ok = np.asarray(jax.device_get(f[GRAD_LEAF_FINITE_KEY]))
    leaf = self._paths[int(np.argmin(leaf_ok))] if not leaf_ok.all() else None
    where = f"first non-finite gradient: {leaf}" if leaf else "every gradient is finite (the norm overflowed)"
    raise NonFiniteError(
      f"non-finite training step {step}: loss={float(jax.device_get(f['loss']))}, "
      f"grad_norm={float(jax.device_get(f['grad_norm']))}; {where}. No checkpoint at or after step {step} was "
      "written; rerunning resumes from the last one (config.on_nonfinite=skip skips such steps instead)"
    )


class Preemption:
  """SIGTERM (a preemption notice) only sets a flag; the loop checks it after each step, saves a checkpoint at that
  step and stops. The previous handler comes back on exit. Outside the main thread (where Python cannot install a
  handler) it does nothing."""

  def __init__(self):
    self.requested_at: float | None = None
    self._previous = None
    self._installed = False

  def __enter__(self) -> Preemption:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    if self.requested_at is None:
      self.requested_at = time.monotonic()

  def requested(self, at_sync_point: bool) -> bool:
    """Whether to stop now. With several processes all must stop at the same step: they agree only at sync points
    (logged steps and checkpoint steps), where the loop waits on the device anyway."""
    if jax.process_count() == 1:
      return self.requested_at is not None
    if not at_sync_point:
      return False
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested_at is not None))))

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
