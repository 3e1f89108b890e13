"""What the launchers share: splitting argv at `--`, env assignments, and run-or-print of shell steps."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import re
import shlex
import subprocess
import sys

Step = tuple[str, str]  # (name, one bash command line)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
  """argv: `[launcher flags] -- <python args>` -> (flags, python args); the python args must be present."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv or argv.index("--") == len(argv) - 1:
    parser.error("give the python arguments after '--', e.g. -- -m kimi_jax.train --config configs/tiny.py")
  split = argv.index("--")
  return parser.parse_args(argv[:split]), argv[split + 1 :]


def add_common_flags(parser: argparse.ArgumentParser, steps: Sequence[str], default_steps: Sequence[str]) -> None:
  parser.add_argument("--dry_run", action="store_true", help="print the commands instead of running them")
  parser.add_argument(
    "--env",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    type=env_assignment,
    help="environment variable for the job (repeatable)",
  )
  parser.add_argument(
    "--steps",
    default=",".join(default_steps),
    type=_steps(steps),
    help=f"comma-separated subset of {','.join(steps)} (default: %(default)s)",
  )


def env_assignment(text: str) -> str:
  if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", text, re.DOTALL):
    raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
  return text


def exports(assignments: Sequence[str]) -> str:
  """['A=1', 'B=x y'] -> "export A=1 'B=x y'" (empty for none)."""
  return f"export {shlex.join(assignments)}" if assignments else ""


def run_steps(steps: Sequence[Step], dry_run: bool, *, always: Sequence[str] = ()) -> int:
  """Prints each step (`# name` then the command); unless dry_run, runs it with bash and stops at the first
  failure. Steps named in `always` (clean-up) still run after a failure. Returns the exit status."""
  status = 0
  for name, line in steps:
    if status and name not in always:
      continue
    print(f"# {name}\n{line}", flush=True)
    if not dry_run:
      code = subprocess.run(["bash", "-o", "pipefail", "-c", line]).returncode
      if code and not status:
        print(f"# {name} failed with exit status {code}", file=sys.stderr, flush=True)
        status = code
  return status


def _steps(allowed: Sequence[str]):
  def parse_steps(text: str) -> list[str]:
    chosen = [s for s in text.split(",") if s]
    if unknown := [s for s in chosen if s not in allowed]:
      raise argparse.ArgumentTypeError(f"unknown steps {unknown}; choose from {','.join(allowed)}")
    return [s for s in allowed if s in chosen]  # always in pipeline order

  return parse_steps
