"""What a run reports: metrics.jsonl and TensorBoard rows (MetricsWriter), where each logged window's wall time went
(WindowClock), and a progress bar (Progress), all on process 0."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import jax
import numpy as np

from kimi_jax.checkpoint.workdir import Workdir
from kimi_jax.chips import device_peak_flops


class MetricsWriter:
  """Process 0 logs each logged step to WORKDIR/metrics.jsonl and to TensorBoard (WORKDIR/tensorboard), on local
  disk or a bucket (see kimi_jax.checkpoint.workdir for how each is written there).

  Adds `mfu` (model FLOPs utilisation against the devices' bf16 peak, when the device kind is known) and an
  expert-load histogram per MoE layer (TensorBoard only; metrics.jsonl keeps the max/mean summary). Rows past
  `resume_step` left by an earlier, interrupted run are dropped: this run logs those steps again.
  """

  def __init__(self, workdir: Workdir, *, resume_step: int, flops_per_token: float):
    self._flops_per_token = flops_per_token
    peak = device_peak_flops(jax.devices()[0].device_kind)
    self._peak = peak * jax.device_count() if peak else None
    self._log = self._events = self._tb = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter

      self._log = workdir.metrics_log(resume_step=resume_step)
      self._events = workdir.events_dir()
      self._tb = SummaryWriter(self._events.local)

  def write(self, step: int, metrics: dict[str, jax.Array], **host_metrics: float) -> dict[str, Any]:
    metrics = jax.device_get(metrics)
    load = metrics.pop("expert_load", None)
    row = {"step": step, **{k: v.tolist() for k, v in metrics.items()}, **host_metrics}
    if self._peak:
      row["mfu"] = row["tokens_per_sec"] * self._flops_per_token / self._peak
    if self._tb is None:
      return row
    self._log.append(row)
    for key, value in row.items():
      if isinstance(value, list):
        for i, v in enumerate(value):
          self._tb.add_scalar(f"{key}/layer_{i}", v, step)
      elif key != "step":
        self._tb.add_scalar(key, value, step)
    if load is not None:  # [L, E]: tokens per expert, as a histogram over experts per layer
      for i, layer_load in enumerate(load):
        self._tb.add_histogram(f"expert_load/moe_layer_{i}", np.asarray(layer_load, np.float64), step)
    if self._events.due():
      self._tb.flush()
      self._events.flush()
    return row

  def flush(self) -> None:
    """Stores everything logged so far (locally only the TensorBoard writer's buffer: metrics.jsonl is appended to
    as it goes)."""
    if self._tb is not None:
      self._log.flush(force=True)
      self._tb.flush()
      self._events.flush(force=True)

  def close(self) -> None:
    if self._tb is not None:
      self._log.flush(force=True)
      self._tb.close()
      self._events.close()


class WindowClock:
  """Where the wall time of a logged window went, as the loop's host thread sees it:

    time_data_s        blocked making the next global batch (the device may still be running the previous step
                       meanwhile, dispatch being asynchronous, so this is an upper bound on what input cost)
    time_checkpoint_s  blocked starting saves (the device-to-host copy) and waiting for them to finish
    time_eval_s        evaluating
    time_step_s        the rest: dispatching train steps and waiting for the device to finish them
    goodput            time_step_s / wall time of the window

  The first window (step 1, logged alone) includes compiling the train step; the first evaluation, the eval step.
  """

  PARTS = ("data", "checkpoint", "eval")

  def __init__(self):
    self.restart()

  def restart(self) -> None:
    self._start = time.perf_counter()
    self._spent = dict.fromkeys(self.PARTS, 0.0)

  @contextlib.contextmanager
  def timing(self, part: str):
    """Counts the time inside the `with` block towards `part` (one of PARTS)."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self._spent[part] += time.perf_counter() - start

  def read(self) -> tuple[float, dict[str, float]]:
    """(wall seconds, the breakdown above) of the window so far; the next window starts now."""
    wall = time.perf_counter() - self._start
    step = max(wall - sum(self._spent.values()), 0.0)
    breakdown = {f"time_{part}_s": spent for part, spent in self._spent.items()}
    breakdown.update(time_step_s=step, goodput=step / wall if wall > 0 else 0.0)
    self.restart()
    return wall, breakdown


class Progress:
  """A one-line progress bar with ETA (tqdm) on process 0."""

  def __init__(self, start: int, total: int):
    self._bar = None
    if jax.process_index() == 0:
      from tqdm import tqdm

      self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
    self._at = start
    self._eval = None

  def update(self, step: int, metrics: dict[str, Any]) -> None:
    if self._bar is not None:
      self._bar.update(step - self._at)
      shown = {"loss": f"{metrics['loss']:.3f}", "tok_s": f"{metrics['tokens_per_sec']:.0f}"}
      self._eval = metrics.get("eval_loss", self._eval)  # the latest evaluation stays shown
      if self._eval is not None:
        shown["eval"] = f"{self._eval:.3f}"
      shown["goodput"] = f"{metrics['goodput']:.0%}"
      self._bar.set_postfix(shown)
    self._at = step

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
