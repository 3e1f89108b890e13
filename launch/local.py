"""N JAX processes on this machine, CPU devices, gloo collectives: the multi-host code path without a cluster.

  python -m launch.local --num_processes 2 --devices_per_process 4 -- -m kimi_jax.train --config configs/tiny.py

Process i runs `python <args>` with JAX_PLATFORMS=cpu, M fake devices (XLA_FLAGS), gloo CPU collectives and
KIMI_COORDINATOR / KIMI_NUM_PROCESSES / KIMI_PROCESS_ID for `kimi_jax.distributed.initialize()`. Output lines
are streamed prefixed with `[i]`. If any process fails, the others are stopped and its exit status returned. A
SIGTERM to the launcher is passed on to every process, as a pod's scheduler sends its preemption notice to every host.
The processes inherit this environment, KIMI_JOIN_TIMEOUT_SECONDS included (how long each waits for the
others to join, default 900 s: enough for a busy machine that starts them minutes apart).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from launch._shell import env_assignment, parse

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def process_env(
  base: Mapping[str, str], process_id: int, num_processes: int, devices: int, port: int, extra: Sequence[str] = ()
) -> dict[str, str]:
  """The environment of process `process_id`: `base` plus the CPU, device-count and coordinator settings."""
  env = {**base, **dict(item.split("=", 1) for item in extra)}
  xla_flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  env.update(
    {
      "JAX_PLATFORMS": "cpu",
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
      "XLA_FLAGS": " ".join([*xla_flags, f"{_DEVICE_COUNT_FLAG}={devices}"]),
      "KIMI_COORDINATOR": f"127.0.0.1:{port}",
      "KIMI_NUM_PROCESSES": str(num_processes),
      "KIMI_PROCESS_ID": str(process_id),
      "PYTHONUNBUFFERED": "1",
    }
  )
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _stream(process: subprocess.Popen, prefix: str, lock: threading.Lock) -> None:
  for line in process.stdout:
    with lock:
      sys.stdout.write(prefix + line)
      sys.stdout.flush()


def _first_failure(processes: Sequence[subprocess.Popen]) -> int:
  return next((p.returncode for p in processes if p.poll() not in (None, 0)), 0)


def launch(
  python_args: Sequence[str], num_processes: int, devices_per_process: int, port: int = 0, extra_env: Sequence[str] = ()
) -> int:
  """Runs the processes to completion; returns 0, or the exit status of the first process that failed."""
  port = port or _free_port()
  lock = threading.Lock()
  processes, streams = [], []

  def forward(signum, frame):  # a preemption notice for the job: every process saves and exits
    del frame
    for process in processes:
      if process.poll() is None:
        process.send_signal(signum)

  in_main = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, forward) if in_main else None
  for i in range(num_processes):
    env = process_env(os.environ, i, num_processes, devices_per_process, port, extra_env)
    process = subprocess.Popen(
      [sys.executable, *python_args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    processes.append(process)
    streams.append(threading.Thread(target=_stream, args=(process, f"[{i}] ", lock), daemon=True))
    streams[-1].start()
  try:
    while _first_failure(processes) == 0 and any(p.poll() is None for p in processes):
      time.sleep(0.05)
  finally:
    if in_main:
      signal.signal(signal.SIGTERM, previous)
  status = _first_failure(processes)
  for process in processes:  # after a failure the others would block in collectives
    if process.poll() is None:
      process.terminate()
  for process, stream in zip(processes, streams):
    process.wait()
    stream.join()
  return status


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m launch.local", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  parser.add_argument(
    "--env",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    type=env_assignment,
    help="extra environment variable for every process (repeatable)",
  )
  parser.add_argument("--dry_run", action="store_true", help="print each process's command instead")
  args, python_args = parse(parser, argv)
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be positive")
  if args.dry_run:
    port = args.port or 12355
    for i in range(args.num_processes):
      env = process_env({}, i, args.num_processes, args.devices_per_process, port, args.env)
      print(shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), sys.executable, *python_args]) + " &")
    print("wait")
    return 0
  return launch(python_args, args.num_processes, args.devices_per_process, args.port, args.env)


if __name__ == "__main__":
  sys.exit(main())
