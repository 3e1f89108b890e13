"""Launchers for kimi-jax: the same `python` command on one machine or a cluster.

  python -m launch.local   N CPU processes on this machine (gloo collectives): tests the multi-host path
  python -m launch.tpu     Cloud TPU queued resources: create, wait, copy, install, run on all workers, delete
  python -m launch.xpk     GKE through xpk: workload create, logs, wait
  python -m launch.slurm   multi-node GPU: sbatch script with srun

Each takes its own flags, then `--`, then the arguments to `python` (e.g. `-- -m kimi_jax.train --config
configs/tiny.py --workdir runs/x`), and `--dry_run` to print the exact shell commands instead of running them.
Processes join the job through `kimi_jax.distributed.initialize()`, configured by the KIMI_* env vars the
launchers set (see README.md).
"""
