"""Cloud TPU (queued resources): create, wait, copy the code, install, run on every worker, delete.

  python -m launch.tpu --name k2 --project my-proj --zone us-east5-a --accelerator v5p-256 \\
      -- -m kimi_jax.train --config configs/kimi_k2.py --workdir gs://my-bucket/k2

Steps (`--steps`, default all of them, in this order):
  create   gcloud compute tpus queued-resources create NAME (node NAME), --spot/--reserved per --capacity
  wait     poll the queued resource until ACTIVE (fails on FAILED/SUSPENDED)
  copy     tar this checkout (without .git/.venv/runs), scp it to every worker, unpack into ~/kimi-jax
  install  uv-made Python 3.12 venv in ~/kimi-jax/.venv with `pip install -e .[tpu]`
  run      the python command on all workers at once (--worker=all) with KIMI_DISTRIBUTED=auto, output
           streamed here with each line prefixed by the worker's hostname
  delete   delete the queued resource and its TPU; runs even when an earlier step failed (--keep skips it)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import shlex
import sys

from launch._shell import Step, add_common_flags, exports, parse, run_steps

STEPS = ("create", "wait", "copy", "install", "run", "delete")
REMOTE_DIR = "kimi-jax"  # relative to the worker's home directory, where ssh commands start
ARCHIVE = "kimi-jax-src.tar.gz"
RUNTIME_VERSIONS = {
  "v4": "tpu-ubuntu2204-base",
  "v5litepod": "v2-alpha-tpuv5-lite",
  "v5p": "v2-alpha-tpuv5",
  "v6e": "v2-alpha-tpuv6e",
}


def build_steps(args: argparse.Namespace, python_args: Sequence[str]) -> list[Step]:
  where = [f"--project={args.project}", f"--zone={args.zone}"]
  qr = ["gcloud", "compute", "tpus", "queued-resources"]
  vm = ["gcloud", "compute", "tpus", "tpu-vm"]

  def on_all_workers(command: str) -> str:
    return shlex.join([*vm, "ssh", args.name, *where, "--worker=all", f"--command={command}"])

  capacity = {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"]}[args.capacity]
  runtime = args.runtime_version or RUNTIME_VERSIONS[args.accelerator.split("-")[0]]
  describe = shlex.join([*qr, "describe", args.name, *where, "--format=value(state.state)"])
  env = exports(["KIMI_DISTRIBUTED=auto", *args.env])
  program = shlex.join([".venv/bin/python", *python_args])
  steps = {
    "create": shlex.join(
      [
        *qr,
        "create",
        args.name,
        f"--node-id={args.name}",
        *where,
        f"--accelerator-type={args.accelerator}",
        f"--runtime-version={runtime}",
        *capacity,
      ]
    ),
    "wait": (
      f'until state=$({describe}); [ "$state" = ACTIVE ]; do '
      f'case "$state" in FAILED|SUSPEND*) echo "queued resource is $state" >&2; exit 1;; esac; '
      f'echo "state: $state"; sleep {args.poll_seconds}; done'
    ),
    "copy": " && ".join(
      [
        shlex.join(
          [
            "tar",
            "-czf",
            f"/tmp/{ARCHIVE}",
            "--exclude=.git",
            "--exclude=.venv",
            "--exclude=runs",
            "--exclude=__pycache__",
            "-C",
            args.source,
            ".",
          ]
        ),
        shlex.join([*vm, "scp", f"/tmp/{ARCHIVE}", f"{args.name}:{ARCHIVE}", *where, "--worker=all"]),
        on_all_workers(f"mkdir -p {REMOTE_DIR} && tar -xzf {ARCHIVE} -C {REMOTE_DIR}"),
      ]
    ),
    "install": on_all_workers(
      f"cd {REMOTE_DIR} && (command -v uv || curl -LsSf https://astral.sh/uv/install.sh | sh) && "
      f"PATH=$HOME/.local/bin:$PATH && ([ -x .venv/bin/python ] || uv venv --python 3.12 .venv) && "
      f"uv pip install --python .venv/bin/python -e '.[tpu]'"
    ),
    "run": on_all_workers(
      f'set -o pipefail && cd {REMOTE_DIR} && {env} && {program} 2>&1 | sed -u "s/^/[$(hostname)] /"'
    ),
    "delete": shlex.join([*qr, "delete", args.name, *where, "--force", "--quiet"]),
  }
  return [(name, steps[name]) for name in args.steps if not (name == "delete" and args.keep)]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m launch.tpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--name", required=True, help="queued resource and TPU node name")
  parser.add_argument("--project", required=True)
  parser.add_argument("--zone", required=True)
  parser.add_argument("--accelerator", required=True, help="accelerator type, e.g. v5p-256, v6e-64")
  parser.add_argument(
    "--runtime_version", default=None, help=f"TPU software version (default by family: {RUNTIME_VERSIONS})"
  )
  parser.add_argument("--capacity", choices=("on-demand", "spot", "reserved"), default="on-demand")
  parser.add_argument("--source", default=".", help="checkout to copy to the workers")
  parser.add_argument("--keep", action="store_true", help="keep the TPU after the run (skip delete)")
  parser.add_argument("--poll_seconds", type=int, default=30)
  add_common_flags(parser, STEPS, STEPS)
  args, python_args = parse(parser, argv)
  if args.runtime_version is None and args.accelerator.split("-")[0] not in RUNTIME_VERSIONS:
    parser.error(f"no default runtime version for {args.accelerator!r}: pass --runtime_version")
  return run_steps(build_steps(args, python_args), args.dry_run, always=("delete",))


if __name__ == "__main__":
  sys.exit(main())
