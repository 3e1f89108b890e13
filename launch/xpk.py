"""GKE through xpk (TPU slices, or GPU nodes): submit the python command as a workload, stream logs, wait.

  python -m launch.xpk --cluster my-cluster --workload k2-run --project my-proj --zone us-east5-a \\
      --tpu_type v5p-256 -- -m kimi_jax.train --config configs/kimi_k2.py --workdir gs://my-bucket/k2

Steps (`--steps`, default create,logs,wait):
  cluster  xpk cluster create (one-off; clusters outlive workloads)
  create   xpk workload create: xpk builds an image from --base_docker_image plus this checkout (--source)
           and runs `pip install -e .[tpu|cuda] && python ...` on every host; with --docker_image it runs
           `python ...` in that image as is. KIMI_DISTRIBUTED=auto is set, plus each --env.
  logs     cluster credentials, then follow every pod's logs (prefixed with the pod name) until they end
  wait     xpk workload list --wait-for-job-completion: fails if the workload failed
  delete   xpk workload delete
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import shlex
import sys

from launch._shell import Step, add_common_flags, parse, run_steps

STEPS = ("cluster", "create", "logs", "wait", "delete")


def build_steps(args: argparse.Namespace, python_args: Sequence[str]) -> list[Step]:
  where = [f"--project={args.project}", f"--zone={args.zone}"]
  device = [f"--tpu-type={args.tpu_type}"] if args.tpu_type else [f"--device-type={args.device_type}"]
  size = [f"--num-slices={args.num_slices}"] if args.tpu_type else [f"--num-nodes={args.num_nodes}"]
  capacity = {"on-demand": ["--on-demand"], "spot": ["--spot"]}.get(args.capacity, [f"--reservation={args.capacity}"])
  program = shlex.join(["python3", *python_args])
  if args.docker_image:
    image, command = [f"--docker-image={args.docker_image}"], program
  else:
    extra = "tpu" if args.tpu_type else "cuda"
    image = [f"--base-docker-image={args.base_docker_image}", f"--script-dir={args.source}"]
    command = f"pip install -e '.[{extra}]' && {program}"
  envs = [f"--env={item}" for item in ("KIMI_DISTRIBUTED=auto", *args.env)]
  credentials = shlex.join(
    [
      "gcloud",
      "container",
      "clusters",
      "get-credentials",
      args.cluster,
      f"--project={args.project}",
      f"--location={args.zone.rsplit('-', 1)[0]}",
    ]
  )
  follow = shlex.join(
    [
      "kubectl",
      "logs",
      "--follow",
      f"--selector=jobset.sigs.k8s.io/jobset-name={args.workload}",
      "--all-containers",
      "--prefix",
      "--max-log-requests=10000",
    ]
  )
  steps = {
    "cluster": shlex.join(["xpk", "cluster", "create", f"--cluster={args.cluster}", *where, *device, *size, *capacity]),
    "create": shlex.join(
      [
        "xpk",
        "workload",
        "create",
        f"--cluster={args.cluster}",
        f"--workload={args.workload}",
        *where,
        *device,
        *size,
        *image,
        f"--priority={args.priority}",
        f"--max-restarts={args.max_restarts}",
        *envs,
        f"--command={command}",
      ]
    ),
    "logs": f"{credentials} && until {follow}; do sleep {args.poll_seconds}; done",
    "wait": shlex.join(
      ["xpk", "workload", "list", f"--cluster={args.cluster}", *where, f"--wait-for-job-completion={args.workload}"]
    ),
    "delete": shlex.join(
      ["xpk", "workload", "delete", f"--cluster={args.cluster}", f"--workload={args.workload}", *where, "--force"]
    ),
  }
  return [(name, steps[name]) for name in args.steps]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m launch.xpk", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--cluster", required=True)
  parser.add_argument("--workload", required=True, help="workload (JobSet) name")
  parser.add_argument("--project", required=True)
  parser.add_argument("--zone", required=True)
  device = parser.add_mutually_exclusive_group(required=True)
  device.add_argument("--tpu_type", help="TPU slice type, e.g. v5p-256")
  device.add_argument("--device_type", help="GPU node type, e.g. h100-80gb-8")
  parser.add_argument("--num_slices", type=int, default=1, help="TPU slices (multi-slice over DCN)")
  parser.add_argument("--num_nodes", type=int, default=1, help="GPU nodes")
  parser.add_argument("--capacity", default="on-demand", help="on-demand, spot, or a reservation name (cluster step)")
  image = parser.add_mutually_exclusive_group()
  image.add_argument("--base_docker_image", default="python:3.12", help="base image for --source")
  image.add_argument("--docker_image", help="ready image containing the code and its dependencies")
  parser.add_argument("--source", default=".", help="checkout xpk adds to the base image")
  parser.add_argument("--priority", default="medium", choices=("very-low", "low", "medium", "high", "very-high"))
  parser.add_argument("--max_restarts", type=int, default=0)
  parser.add_argument("--poll_seconds", type=int, default=15)
  add_common_flags(parser, STEPS, ("create", "logs", "wait"))
  args, python_args = parse(parser, argv)
  return run_steps(build_steps(args, python_args), args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
