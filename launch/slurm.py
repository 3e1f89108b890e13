"""Multi-node GPU with SLURM: writes an sbatch script that runs the python command with srun, and submits it.

  python -m launch.slurm --nodes 4 --gpus_per_node 8 --partition gpu --time 24:00:00 \\
      --setup "source .venv/bin/activate" -- -m kimi_jax.train --config configs/kimi_k2.py --workdir runs/k2

One task per node drives all of the node's GPUs; `srun --label` prefixes each output line with the task id.
KIMI_DISTRIBUTED=auto makes `kimi_jax.distributed.initialize()` call `jax.distributed.initialize()`, which
reads the SLURM step (coordinator: the first node). Steps (`--steps`, default both):
  script   write the sbatch script to --script (printed as a heredoc under --dry_run)
  submit   sbatch SCRIPT (with --wait: block until the job ends and return its status)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import os
import shlex
import sys

from launch._shell import Step, add_common_flags, exports, parse, run_steps

STEPS = ("script", "submit")


def sbatch_script(args: argparse.Namespace, python_args: Sequence[str]) -> str:
  directives = {
    "job-name": args.job_name,
    "nodes": args.nodes,
    "ntasks-per-node": 1,
    "gpus-per-node": args.gpus_per_node,
    "cpus-per-task": args.cpus_per_task,
    "time": args.time,
    "partition": args.partition,
    "account": args.account,
    "output": args.output,
    "chdir": os.path.abspath(args.chdir),
  }
  lines = ["#!/bin/bash"]
  lines += [f"#SBATCH --{key}={value}" for key, value in directives.items() if value is not None]
  lines += ["#SBATCH --exclusive", "set -euo pipefail"]
  lines += [*args.setup, exports(["KIMI_DISTRIBUTED=auto", *args.env])]
  lines.append(shlex.join(["srun", "--label", "--kill-on-bad-exit=1", args.python, *python_args]))
  return "\n".join(lines) + "\n"


def build_steps(args: argparse.Namespace, python_args: Sequence[str]) -> list[Step]:
  script = sbatch_script(args, python_args)
  path = shlex.quote(args.script)
  steps = {
    "script": f"mkdir -p \"$(dirname {path})\" && cat > {path} <<'KIMI_SBATCH_EOF'\n{script}KIMI_SBATCH_EOF",
    "submit": shlex.join(["sbatch", *(["--wait"] if args.wait else []), args.script]),
  }
  return [(name, steps[name]) for name in args.steps]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m launch.slurm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--nodes", type=int, required=True)
  parser.add_argument("--gpus_per_node", type=int, default=8)
  parser.add_argument("--cpus_per_task", type=int, default=None)
  parser.add_argument("--partition", default=None)
  parser.add_argument("--account", default=None)
  parser.add_argument("--time", default=None, help="wall-clock limit, e.g. 24:00:00")
  parser.add_argument("--job_name", default="kimi-jax")
  parser.add_argument("--output", default="%x-%j.out", help="sbatch --output pattern")
  parser.add_argument("--chdir", default=".", help="directory the job runs in (the checkout, on shared storage)")
  parser.add_argument(
    "--setup",
    action="append",
    default=[],
    help="shell line run before srun, e.g. 'source .venv/bin/activate' (repeatable)",
  )
  parser.add_argument("--python", default="python", help="python executable on the nodes")
  parser.add_argument("--script", default="runs/slurm/kimi-jax.sbatch", help="where to write the script")
  parser.add_argument("--wait", action="store_true", help="sbatch --wait: return the job's exit status")
  add_common_flags(parser, STEPS, STEPS)
  args, python_args = parse(parser, argv)
  return run_steps(build_steps(args, python_args), args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
