"""Multi-process start-up: call `initialize()` once, before any other JAX call.

Which processes form the job comes from the environment (the `launch/` scripts set it):
  KIMI_COORDINATOR=host:port, KIMI_NUM_PROCESSES=N, KIMI_PROCESS_ID=i
      explicit: any cluster, and `python -m launch.local` (CPU processes on one machine).
      Optional KIMI_LOCAL_DEVICE_IDS=0,1,...: the local devices this process drives.
  KIMI_DISTRIBUTED=auto
      `jax.distributed.initialize()` with no arguments: JAX finds the coordinator on Cloud TPU pods (queued
      resources, GKE/xpk), SLURM and Open MPI. `launch.tpu`, `launch.xpk` and `launch.slurm` set it.
  KIMI_DISTRIBUTED=off
      one process, whatever the environment says.
With none of these set, a SLURM step of several tasks and an Open MPI job of several ranks are detected
from their own variables (as auto); anything else runs as a single process and nothing is initialised.
"""

from __future__ import annotations

from collections.abc import Mapping
import os

import jax

_EXPLICIT = ("KIMI_COORDINATOR", "KIMI_NUM_PROCESSES", "KIMI_PROCESS_ID")


def plan(env: Mapping[str, str]) -> dict | None:
  """The `jax.distributed.initialize` keyword arguments `env` asks for, or None for a single process."""
  mode = env.get("KIMI_DISTRIBUTED", "").lower()
  if mode not in ("", "auto", "off"):
    raise ValueError(f"KIMI_DISTRIBUTED must be 'auto' or 'off', got {env['KIMI_DISTRIBUTED']!r}")
  if mode == "off":
    return None
  if any(name in env for name in _EXPLICIT):
    if missing := [name for name in _EXPLICIT if not env.get(name)]:
      raise ValueError(f"an explicit job needs all of {', '.join(_EXPLICIT)}; missing {', '.join(missing)}")
    kwargs = {
      "coordinator_address": env["KIMI_COORDINATOR"],
      "num_processes": int(env["KIMI_NUM_PROCESSES"]),
      "process_id": int(env["KIMI_PROCESS_ID"]),
    }
    if env.get("KIMI_LOCAL_DEVICE_IDS"):
      kwargs["local_device_ids"] = [int(i) for i in env["KIMI_LOCAL_DEVICE_IDS"].split(",")]
    return kwargs
  if (
    mode == "auto"
    or int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1
    or (int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
  ):
    return {}
  return None


def initialize(env: Mapping[str, str] | None = None) -> bool:
  """Joins the multi-process job described by `env` (default os.environ). Returns whether one was joined."""
  kwargs = plan(os.environ if env is None else env)
  if kwargs is None:
    return False
  if not jax.distributed.is_initialized():
    jax.distributed.initialize(**kwargs)
  return True
