"""Training on a gs:// workdir, against a real GCS API server on 127.0.0.1 (the `gcs` fixture,
tests/helpers/gcs_server.py): the run's files are objects in the bucket, a rerun resumes from the bucket's checkpoint
and logs the losses of an uninterrupted local run, the model loads from the bucket, nothing named `gs:` appears on local
disk, and a missing bucket is one line naming the URL."""

import json
import os
from pathlib import Path
import re
import signal
import subprocess
import time

from helpers.paths import REPO
from helpers.train import child_env, read_metrics, small_config, small_config_file, train_command
import numpy as np
import pytest

from kimi_jax.train import train

BUCKET = "kimi-jax-test"
STEPS = 24  # checkpoints every 4 steps (small_config): a SIGKILL after the first still finds the run going


def losses(rows):
  return [r["loss"] for r in rows]


pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def bucket(gcs):
  return gcs.create_bucket(BUCKET)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("local")
  train(small_config(STEPS), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def gcs_run(gcs, bucket, tmp_path_factory):
  """The same run with --workdir gs://BUCKET/run, from a fresh current directory (a stray local `gs:` shows)."""
  cwd = os.getcwd()
  os.chdir(tmp_path_factory.mktemp("cwd"))
  try:
    train(small_config(STEPS), f"gs://{bucket}/run")
  finally:
    os.chdir(cwd)
  return f"gs://{bucket}/run"


def gcs_metrics(gcs, bucket, prefix="run"):
  return [json.loads(line) for line in gcs.read_object(bucket, f"{prefix}/metrics.jsonl").decode().splitlines()]


def test_the_run_is_objects_in_the_bucket(gcs, bucket, gcs_run, local_run):
  # The standard client, pointed at the server by STORAGE_EMULATOR_HOST alone.
  from google.cloud import storage

  names = {b.name for b in storage.Client(project="test").list_blobs(bucket, prefix="run/")}
  assert {"run/run_config.json", "run/metrics.jsonl"} <= names
  kept = range(STEPS - 4 * (small_config(STEPS).keep_checkpoints - 1), STEPS + 1, 4)
  steps = {int(n.split("/")[2]) for n in names if n.startswith("run/checkpoints/") and n.split("/")[2].isdigit()}
  assert steps == set(kept)
  for step in kept:  # Orbax's marker that the step's upload finished
    assert f"run/checkpoints/{step}/commit_success.txt" in names
  events = [n for n in names if n.startswith("run/tensorboard/events.out.tfevents.")]
  assert len(events) == 1 and b"expert_load/moe_layer_0" in gcs.read_object(bucket, events[0])
  assert json.loads(gcs.read_object(bucket, "run/run_config.json"))["model"]["hidden_size"] == 32
  rows = gcs_metrics(gcs, bucket)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  np.testing.assert_allclose(losses(rows), losses(read_metrics(local_run)), rtol=0, atol=1e-6)


def test_resume_from_the_bucket_matches_an_uninterrupted_local_run(gcs, bucket, gcs_run, local_run, capsys):
  """A preemption after the last step was logged but before its checkpoint landed."""
  last = f"run/checkpoints/{STEPS}/"
  for name in gcs.list_objects(bucket, last):
    gcs.delete_object(bucket, name)
  capsys.readouterr()
  train(small_config(STEPS), gcs_run)
  assert f"resuming at step {STEPS - 4}" in capsys.readouterr().out
  rows = gcs_metrics(gcs, bucket)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # the lost rows were replaced, not repeated
  np.testing.assert_allclose(losses(rows), losses(read_metrics(local_run)), rtol=0, atol=1e-6)
  assert f"{last}commit_success.txt" in gcs.list_objects(bucket, last)


def test_forward_loads_the_model_from_the_bucket(gcs_run, local_run):
  from flax import nnx
  import jax

  from kimi_jax.checkpoint.model_io import load_any

  cfg, model = load_any(gcs_run)
  cfg_local, model_local = load_any(str(local_run))
  assert cfg == cfg_local
  got, want = nnx.state(model, nnx.Variable).to_pure_dict(), nnx.state(model_local, nnx.Variable).to_pure_dict()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_a_run_initialised_from_the_bucket(gcs_run, local_run, tmp_path):
  c = small_config(STEPS)
  c.init_from = gcs_run  # --config.init_from=gs://...: the trained weights, read from the bucket
  train(c, str(tmp_path))
  assert read_metrics(tmp_path)[0]["loss"] < read_metrics(local_run)[0]["loss"] - 0.5


def test_sigkill_then_the_same_command_resumes_from_the_bucket(gcs, bucket, local_run, tmp_path, compilation_cache):
  """`python -m kimi_jax.train --workdir gs://...` killed once its first checkpoint is in the bucket, then run
  again: the losses are those of the uninterrupted local run."""

  url = f"gs://{bucket}/killed"
  command = train_command(small_config_file(tmp_path / "config.py", STEPS), url)
  env = child_env(compilation_cache)
  (tmp_path / "tmp").mkdir()
  env["TMPDIR"] = str(tmp_path / "tmp")  # the killed run cannot remove its local TensorBoard directory
  log = tmp_path / "killed.log"  # a file, not a pipe: nobody reads a pipe while we poll, and a full one blocks
  with log.open("w") as out:
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "killed/checkpoints/4/commit_success.txt" not in gcs.list_objects(bucket, "killed/checkpoints/4/"):
      assert process.poll() is None, log.read_text()[-3000:]
      assert time.monotonic() < deadline, "no checkpoint in the bucket after 120 s"
      time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
  assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  assert f"killed/checkpoints/{STEPS}/commit_success.txt" not in gcs.list_objects(bucket, "killed/")

  again = subprocess.run(command, check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  resumed = re.search(r"resuming at step (\d+)", again.stdout)
  assert resumed and 4 <= int(resumed[1]) < STEPS, again.stdout
  rows = gcs_metrics(gcs, bucket, "killed")
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  np.testing.assert_allclose(losses(rows), losses(read_metrics(local_run)), rtol=0, atol=1e-6)
  assert not (tmp_path / "gs:").exists() and not (REPO / "gs:").exists()


@pytest.mark.parametrize("where", ["local", "gs"])
def test_metrics_log_keeps_the_rows_up_to_the_resumed_step(where, bucket, tmp_path):
  """Rows a killed run logged after its last checkpoint are replaced by the resumed run's, not repeated; a local
  line cut short by the kill is dropped."""
  from kimi_jax.checkpoint.workdir import Workdir

  wd = Workdir(str(tmp_path) if where == "local" else f"gs://{bucket}/metrics-{tmp_path.name}")
  wd.create()
  log = wd.metrics_log(resume_step=0)
  for step in range(1, 6):
    log.append({"step": step})
  log.flush(force=True)
  if where == "local":
    with open(tmp_path / "metrics.jsonl", "a") as f:
      f.write('{"step": 6, "lo')
  log = wd.metrics_log(resume_step=3)
  log.append({"step": 4, "again": True})
  log.flush(force=True)
  assert wd.read_metrics() == [{"step": 1}, {"step": 2}, {"step": 3}, {"step": 4, "again": True}]


def test_missing_bucket_is_one_line_naming_the_url(gcs):
  url = "gs://kimi-jax-no-such-bucket/run"
  with pytest.raises(FileNotFoundError) as e:
    train(small_config(1), url)
  message = str(e.value)
  assert url in message and "\n" not in message and "gcloud storage buckets create" in message


def test_no_local_path_named_gs(gcs_run, tmp_path_factory):
  roots = [Path.cwd(), tmp_path_factory.getbasetemp(), REPO]
  for root in roots:
    assert not (root / "gs:").exists(), root
  assert not [p for p in tmp_path_factory.getbasetemp().rglob("gs:")]
