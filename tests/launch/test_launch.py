"""launch/*: a real 2-process run with launch.local, and the exact commands the cloud launchers print."""

import os
import shlex
import subprocess
import sys
import textwrap

from helpers.paths import REPO
import pytest

from kimi_jax import distributed
from launch import local, slurm, tpu, xpk

TRAIN = ["-m", "kimi_jax.train", "--config", "configs/kimi_k2.py", "--workdir", "gs://bucket/run 1"]

PSUM = """
from kimi_jax import distributed
assert distributed.initialize()
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((8,), ("d",))
local = np.arange(4.0) + 4 * jax.process_index()  # process p holds 4p .. 4p+3: all together 0..7
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
total = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "d"), mesh=mesh, in_specs=P("d"), out_specs=P()))(x)
print("devices", jax.device_count(), "local", jax.local_device_count(), "psum", float(total.addressable_data(0)[0]))
"""


def _launch_local(tmp_path, script, *flags):
  path = tmp_path / "script.py"
  path.write_text(textwrap.dedent(script))
  return subprocess.run(
    [sys.executable, "-m", "launch.local", *flags, "--", str(path)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_local_psum_over_two_processes(tmp_path):
  proc = _launch_local(tmp_path, PSUM, "--num_processes", "2", "--devices_per_process", "4")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for i in range(2):
    assert f"[{i}] devices 8 local 4 psum 28.0" in proc.stdout.splitlines(), proc.stdout


def test_local_failure_stops_the_others(tmp_path):
  script = """
  import os, sys, time
  if os.environ["KIMI_PROCESS_ID"] == "1":
    print("failing")
    sys.exit(3)
  time.sleep(120)
  """
  proc = _launch_local(tmp_path, script, "--num_processes", "2")
  assert proc.returncode == 3
  assert "[1] failing" in proc.stdout


def test_local_process_env():
  env = local.process_env(
    {"XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_dump_to=/tmp/d", "HOME": "/h"},
    1,
    2,
    4,
    1234,
    ["A=x=y"],
  )
  assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4"
  assert (env["KIMI_COORDINATOR"], env["KIMI_NUM_PROCESSES"], env["KIMI_PROCESS_ID"]) == ("127.0.0.1:1234", "2", "1")
  assert (env["JAX_PLATFORMS"], env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"], env["A"], env["HOME"]) == (
    "cpu",
    "gloo",
    "x=y",
    "/h",
  )


def test_distributed_plan():
  explicit = {"KIMI_COORDINATOR": "10.0.0.1:1234", "KIMI_NUM_PROCESSES": "4", "KIMI_PROCESS_ID": "2"}
  assert distributed.plan(explicit) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
  assert distributed.plan({**explicit, "KIMI_LOCAL_DEVICE_IDS": "0,1"})["local_device_ids"] == [0, 1]
  assert distributed.plan({}) is None
  assert distributed.plan({"KIMI_DISTRIBUTED": "auto"}) == {}
  assert distributed.plan({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8"}) == {}
  assert distributed.plan({"SLURM_NTASKS": "1"}) is None
  assert distributed.plan({"OMPI_COMM_WORLD_SIZE": "2"}) == {}
  assert distributed.plan({**explicit, "KIMI_DISTRIBUTED": "off"}) is None
  with pytest.raises(ValueError, match="missing KIMI_PROCESS_ID"):
    distributed.plan({"KIMI_COORDINATOR": "h:1", "KIMI_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="KIMI_DISTRIBUTED must be"):
    distributed.plan({"KIMI_DISTRIBUTED": "yes"})
  assert distributed.initialize({}) is False  # single process: nothing to join


def _dry_run(main, argv, capsys):
  assert main([*argv, "--dry_run", "--", *TRAIN]) == 0
  out = capsys.readouterr().out
  steps, lines = [], out.splitlines()
  for comment, command in zip(lines[::2], lines[1::2]):
    steps.append((comment.removeprefix("# "), command))
  return dict(steps), out


def _flag(argv, name):
  return next(arg.split("=", 1)[1] for arg in argv if arg.startswith(f"--{name}="))


def test_tpu_dry_run(capsys):
  argv = [
    "--name",
    "k2",
    "--project",
    "my-proj",
    "--zone",
    "us-east5-a",
    "--accelerator",
    "v5p-256",
    "--capacity",
    "spot",
    "--env",
    "WANDB_NAME=a run",
  ]
  steps, _ = _dry_run(tpu.main, argv, capsys)
  assert list(steps) == list(tpu.STEPS)
  assert shlex.split(steps["create"]) == [
    "gcloud",
    "compute",
    "tpus",
    "queued-resources",
    "create",
    "k2",
    "--node-id=k2",
    "--project=my-proj",
    "--zone=us-east5-a",
    "--accelerator-type=v5p-256",
    "--runtime-version=v2-alpha-tpuv5",
    "--spot",
  ]
  assert "$(gcloud compute tpus queued-resources describe k2 --project=my-proj --zone=us-east5-a" in steps["wait"]
  run = shlex.split(steps["run"])
  assert run[:9] == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    "k2",
    "--project=my-proj",
    "--zone=us-east5-a",
    "--worker=all",
  ]
  remote = shlex.split(_flag(run, "command"))  # what the workers' shell sees
  assert ["export", "KIMI_DISTRIBUTED=auto", "WANDB_NAME=a run", "&&", ".venv/bin/python", *TRAIN] == remote[
    remote.index("export") : remote.index("export") + 5 + len(TRAIN)
  ]
  assert shlex.split(steps["delete"])[4:] == [
    "delete",
    "k2",
    "--project=my-proj",
    "--zone=us-east5-a",
    "--force",
    "--quiet",
  ]
  assert "--worker=all" in shlex.split(steps["install"]) and "--worker=all" in shlex.split(steps["copy"])


FAKE_GCLOUD = """#!/bin/bash
echo "$*" >> "$GCLOUD_LOG"
case "$*" in *describe*) n=$(wc -l < "$GCLOUD_LOG"); [ "$n" -lt 3 ] && echo PROVISIONING || echo "$QR_STATE";; esac
case "$*" in *"$GCLOUD_FAIL_ON"*) exit 7;; esac
"""


@pytest.mark.parametrize(
  "state, fail_on, status", [("ACTIVE", "never", 0), ("ACTIVE", "kimi_jax.train", 7), ("FAILED", "never", 1)]
)
def test_tpu_runs_steps_in_order(tmp_path, monkeypatch, capsys, state, fail_on, status):
  """The real (not dry-run) path against a fake gcloud: the order of calls, and delete after a failure."""
  bin_dir, log = tmp_path / "bin", tmp_path / "gcloud.log"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  (tmp_path / "src").mkdir()
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  monkeypatch.setenv("GCLOUD_LOG", str(log))
  monkeypatch.setenv("QR_STATE", state)
  monkeypatch.setenv("GCLOUD_FAIL_ON", fail_on)
  argv = [
    "--name",
    "k2",
    "--project",
    "p",
    "--zone",
    "z",
    "--accelerator",
    "v5p-8",
    "--poll_seconds",
    "0",
    "--source",
    str(tmp_path / "src"),
    "--",
    *TRAIN,
  ]
  assert tpu.main(argv) == status
  calls = [line.split()[2:4] for line in log.read_text().splitlines()]  # "compute tpus <group> <verb>"
  expected = [["queued-resources", "create"], ["queued-resources", "describe"], ["queued-resources", "describe"]]
  if state == "ACTIVE":
    expected += [["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
  assert calls == [*expected, ["queued-resources", "delete"]]


def test_tpu_keep_and_steps(capsys):
  argv = ["--name", "n", "--project", "p", "--zone", "z", "--accelerator", "v6e-64", "--steps", "run,create", "--keep"]
  steps, _ = _dry_run(tpu.main, argv, capsys)
  assert list(steps) == ["create", "run"]
  assert "--runtime-version=v2-alpha-tpuv6e" in shlex.split(steps["create"])


def test_xpk_dry_run(capsys):
  argv = [
    "--cluster",
    "c1",
    "--workload",
    "k2-run",
    "--project",
    "p",
    "--zone",
    "us-east5-a",
    "--tpu_type",
    "v5p-256",
    "--num_slices",
    "2",
    "--env",
    "A=b c",
    "--steps",
    "create,logs,wait,delete",
  ]
  steps, _ = _dry_run(xpk.main, argv, capsys)
  create = shlex.split(steps["create"])
  assert create[:3] == ["xpk", "workload", "create"]
  for flag in (
    "--cluster=c1",
    "--workload=k2-run",
    "--tpu-type=v5p-256",
    "--num-slices=2",
    "--project=p",
    "--zone=us-east5-a",
    "--script-dir=.",
    "--env=KIMI_DISTRIBUTED=auto",
    "--env=A=b c",
  ):
    assert flag in create
  assert shlex.split(_flag(create, "command")) == ["pip", "install", "-e", ".[tpu]", "&&", "python3", *TRAIN]
  assert "--location=us-east5" in shlex.split(steps["logs"])
  assert "--selector=jobset.sigs.k8s.io/jobset-name=k2-run" in shlex.split(steps["logs"])
  assert "--wait-for-job-completion=k2-run" in shlex.split(steps["wait"])
  assert shlex.split(steps["delete"])[:3] == ["xpk", "workload", "delete"]


def test_slurm_dry_run_and_script(tmp_path, capsys):
  script = tmp_path / "job dir" / "k2.sbatch"
  argv = [
    "--nodes",
    "4",
    "--partition",
    "gpu",
    "--time",
    "24:00:00",
    "--setup",
    "source .venv/bin/activate",
    "--script",
    str(script),
  ]
  steps, _ = _dry_run(slurm.main, [*argv, "--steps", "submit"], capsys)
  assert shlex.split(steps["submit"]) == ["sbatch", str(script)]
  # The script step really runs (bash writes the file); submitting needs a cluster.
  assert slurm.main([*argv, "--steps", "script", "--", *TRAIN]) == 0
  lines = script.read_text().splitlines()
  for directive in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu", "--time=24:00:00"):
    assert f"#SBATCH {directive}" in lines
  assert "source .venv/bin/activate" in lines and "export KIMI_DISTRIBUTED=auto" in lines
  assert shlex.split(lines[-1]) == ["srun", "--label", "--kill-on-bad-exit=1", "python", *TRAIN]


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--num_processes", "2"], "give the python arguments after '--'"),
    (["--num_processes", "2", "--env", "1A=x", "--", "x.py"], "expected KEY=VALUE"),
  ],
)
def test_local_bad_arguments(argv, message, capsys):
  with pytest.raises(SystemExit):
    local.main(argv)
  assert message in capsys.readouterr().err


def test_unknown_step(capsys):
  with pytest.raises(SystemExit):
    slurm.main(["--nodes", "1", "--steps", "script,launch", "--", *TRAIN])
  assert "unknown steps ['launch']" in capsys.readouterr().err
