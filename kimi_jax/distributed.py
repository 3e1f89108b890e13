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

Joining waits for the slowest process:
  KIMI_JOIN_TIMEOUT_SECONDS=900 (default)
      how long each process waits for all the others to join. Hosts of a pod start minutes apart (VMs boot,
      containers pull images, `pip install` runs on every worker) and a busy machine can take minutes to start
      N Python processes, so the default is 15 minutes: far more skew than a healthy start-up shows, and still a
      bounded wait when a host never comes. JAX's own defaults are shorter (5 minutes to connect,
      `initialization_timeout`; 2 minutes for the CPU backend's topology exchange,
      `jax_cpu_get_local_topology_timeout_minutes`, which is what a late `launch.local` process ran into).
`initialize()` joins completely: it connects to the coordinator (which waits until all N processes have
registered) and builds the backend (whose CPU topology exchange waits for every process's devices); each of
the two waits is bounded by this timeout (the second rounded up to whole minutes, JAX's unit). If the job has
not formed, the process stops with one message naming the process(es) that never arrived where that can be
told (else this process, the coordinator and the number expected), the timeout, and what to do: a
connect that times out exits with status 75 (`JOIN_FAILED_STATUS`; JAX would abort the process from C++), a
failure JAX reports raises `JoinError`.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
import os
import re
import socket
import sys
import threading

import jax

_EXPLICIT = ("KIMI_COORDINATOR", "KIMI_NUM_PROCESSES", "KIMI_PROCESS_ID")
JOIN_TIMEOUT_VAR = "KIMI_JOIN_TIMEOUT_SECONDS"
DEFAULT_JOIN_TIMEOUT_SECONDS = 900
JOIN_FAILED_STATUS = 75  # EX_TEMPFAIL: the job did not form; starting it again may work
# JAX's own connect deadline is set this much later than ours, so that ours fires first with the clear message
# (JAX's aborts the process with a bare DEADLINE_EXCEEDED from the RegisterTask RPC).
_JAX_GRACE_SECONDS = 30
# "GetKeyValue() timed out with key: cpu:local_topology/cpu/1": process 1 never published its devices.
_TOPOLOGY_KEY = re.compile(r"local_topology/\w+/(\d+)")


class JoinError(RuntimeError):
  """The multi-process job did not form."""


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


def join_timeout(env: Mapping[str, str]) -> int:
  """Seconds each process waits for the others to join: KIMI_JOIN_TIMEOUT_SECONDS, default 900."""
  value = env.get(JOIN_TIMEOUT_VAR, "")
  if not value:
    return DEFAULT_JOIN_TIMEOUT_SECONDS
  try:
    seconds = int(value)
  except ValueError:
    seconds = 0
  if seconds <= 0:
    raise ValueError(f"{JOIN_TIMEOUT_VAR} must be a positive whole number of seconds, got {value!r}")
  return seconds


def _reachable(address: str | None) -> bool | None:
  """Whether something accepts TCP connections at host:port (None: no address to try)."""
  if not address or ":" not in address:
    return None
  host, port = address.rsplit(":", 1)
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
      return True
  except (OSError, ValueError):
    return False


def join_failure_message(
  *,
  process_id: int | None,
  num_processes: int | None,
  coordinator: str | None,
  timeout: int,
  missing: list[int] | None = None,
  coordinator_up: bool | None = None,
  cause: str | None = None,
) -> str:
  """The one message a process prints when the job did not form within `timeout` seconds."""
  me = "this process" if process_id is None else f"process {process_id}"
  expected = "the expected number of processes" if num_processes is None else f"{num_processes} processes"
  at = f"coordinator {coordinator}" if coordinator else "the coordinator JAX detected"
  if (
    not missing
    and num_processes == 2
    and process_id in (0, 1)
    and (coordinator_up if process_id == 0 else coordinator_up is False)
  ):
    missing = [1 - process_id]  # a connect that timed out in a job of two: the other process
  if missing:
    who = ", ".join(map(str, missing))
    arrived = f"process{'es' if len(missing) > 1 else ''} {who} never arrived"
    if missing == [0]:
      arrived += f" (the coordinator, {coordinator}: not started, or not reachable from here)"
  elif process_id == 0:
    arrived = f"not all of the other {'processes' if num_processes is None else num_processes - 1} arrived"
  elif coordinator_up is False:
    arrived = f"process 0 (the coordinator, {coordinator}) never came up or cannot be reached from here"
  elif coordinator_up:
    arrived = "the coordinator is up, but not all of the other processes arrived"
  else:
    arrived = "not every process arrived"
  lines = [
    f"kimi_jax.distributed: the multi-process job did not form: {arrived}.",
    f"  {me} waited {timeout} s ({JOIN_TIMEOUT_VAR}) at {at} for {expected} to join.",
    "  What to do: start every process of the job (check the missing ones' logs: did they crash at start-up?);",
    f"  if hosts start far apart, raise {JOIN_TIMEOUT_VAR} on every process (default {DEFAULT_JOIN_TIMEOUT_SECONDS});",
    f"  check that {coordinator or 'the coordinator address'} is process 0's host and reachable from every host",
    "  (same port, no firewall, no proxy variables in the environment).",
  ]
  if cause:
    lines.append(f"  JAX said: {cause.strip().splitlines()[0][:500]}")
  return "\n".join(lines)


def _state(kwargs: Mapping) -> tuple[int | None, int | None, str | None]:
  """(process id, process count, coordinator): what JAX settled on (auto mode detects them), else `kwargs`."""
  try:
    from jax._src.distributed import global_state as state
  except ImportError:  # another JAX version
    state = None
  coordinator = getattr(state, "coordinator_address", None) or kwargs.get("coordinator_address")
  process_id = kwargs.get("process_id", getattr(state, "process_id", None) if coordinator else None)
  num_processes = kwargs.get("num_processes")
  if num_processes is None and state is not None and getattr(state, "num_processes", 1) > 1:
    num_processes = state.num_processes
  return process_id, num_processes, coordinator


def _raise_topology_timeouts(timeout: int) -> None:
  """Lets the CPU backend's topology exchange wait as long as the join (JAX's default: 2 and 5 minutes)."""
  local = math.ceil(timeout / 60)
  for name, minutes in (
    ("jax_cpu_get_local_topology_timeout_minutes", local),
    ("jax_cpu_get_global_topology_timeout_minutes", local + 1),  # must exceed the local one
  ):
    try:
      if getattr(jax.config, name, minutes) < minutes:
        jax.config.update(name, minutes)
    except (AttributeError, RuntimeError, ValueError):  # another JAX version, or the backend already exists
      pass


def _watchdog(done: threading.Event, timeout: int, kwargs: Mapping) -> None:
  if done.wait(timeout):
    return
  process_id, num_processes, coordinator = _state(kwargs)
  up = _reachable(coordinator) if process_id != 0 else True
  message = join_failure_message(
    process_id=process_id, num_processes=num_processes, coordinator=coordinator, timeout=timeout, coordinator_up=up
  )
  sys.stderr.write(message + "\n")
  sys.stderr.flush()
  os._exit(JOIN_FAILED_STATUS)  # the join blocks in C++: no exception can reach the main thread


def initialize(env: Mapping[str, str] | None = None) -> bool:
  """Joins the multi-process job described by `env` (default os.environ). Returns whether one was joined.

  Waits up to KIMI_JOIN_TIMEOUT_SECONDS for every process to connect, and as long again for the backend's
  device-topology exchange (this builds the JAX backend). A connect past the deadline exits with
  JOIN_FAILED_STATUS and the message on stderr; a failure JAX reports raises JoinError with the message.
  """
  env = os.environ if env is None else env
  kwargs = plan(env)
  if kwargs is None:
    return False
  if jax.distributed.is_initialized():
    return True
  timeout = join_timeout(env)
  _raise_topology_timeouts(timeout)
  done = threading.Event()
  threading.Thread(target=_watchdog, args=(done, timeout, kwargs), name="kimi-join-watchdog", daemon=True).start()
  try:
    jax.distributed.initialize(**kwargs, initialization_timeout=timeout + _JAX_GRACE_SECONDS)
    done.set()  # connected: JAX's own deadline bounds the topology exchange, and its error names the late process
    jax.devices()  # the backend's topology exchange: the last step that waits for every process
  except RuntimeError as e:  # JaxRuntimeError: a deadline or a peer's failure (bad arguments stay ValueError)
    done.set()
    process_id, num_processes, coordinator = _state(kwargs)
    missing = sorted({int(i) for i in _TOPOLOGY_KEY.findall(str(e))}) or None
    raise JoinError(
      join_failure_message(
        process_id=process_id,
        num_processes=num_processes,
        coordinator=coordinator,
        timeout=timeout,
        missing=missing,
        cause=f"{type(e).__name__}: {e}",
      )
    ) from e
  done.set()
  return True
