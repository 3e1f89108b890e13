"""An unwritable or full workdir fails at start-up (or at the failing save) in one line naming the path and the reason.

Real file systems, no mocks: a tmpfs mounted (read-only, small, or filled up) in a private mount namespace
(helpers.tmpfs; skipped where user namespaces are unavailable), and a path under a regular file.
"""

import errno
import os
import shutil
import sys
import textwrap

from helpers.paths import REPO, TINY_CONFIG, python_path_env
from helpers.tmpfs import run_in_tmpfs
import pytest

from kimi_jax.checkpoint.workdir import Workdir

# A two-layer model of hidden size 64: one checkpoint of its train state (params and optimizer moments) is ~4.1 MB.
SMALL = [
  "--config.log_every=1",
  "--config.sample_tokens=0",
  "--config.batch_size=4",
  "--config.seq_len=32",
  "--config.model.dtype=float32",
  "--config.model.hidden_size=64",
  "--config.model.num_hidden_layers=2",
]


def train_command(workdir):
  return [sys.executable, "-m", "kimi_jax.train", "--config", str(TINY_CONFIG), "--workdir", str(workdir), *SMALL]


def env(**extra):
  return python_path_env({**os.environ, "JAX_PLATFORMS": "cpu", **extra})


def line_with(text, *parts):
  """The last line of `text` holding all of `parts` (in a traceback: the exception raised, after its causes)."""
  return next((line for line in reversed(text.splitlines()) if all(p in line for p in parts)), None)


def run_train_in_tmpfs(mount, workdir, *, size, read_only=False, fill=False):
  return run_in_tmpfs(
    mount,
    'cd "$REPO" && exec "$@"',
    *train_command(workdir),
    "--config.steps=2",
    size=size,
    read_only=read_only,
    fill=fill,
    env=env(REPO=str(REPO)),
  )


def assert_failed_at_startup(p, workdir, reason):
  assert p.returncode != 0, p.stdout[-2000:]
  line = line_with(p.stderr, str(workdir), reason)
  assert line == p.stderr.strip().splitlines()[-1], p.stderr[-3000:]  # the traceback's last line: what was raised
  assert f"{workdir}: cannot write to the workdir ({reason}); " in line, line
  assert "kimi-jax train:" not in p.stdout, p.stdout  # the run summary (after the model is set up) never printed
  return line


def test_read_only_workdir_fails_at_startup_naming_the_path(tmp_path):
  mount = tmp_path / "ro"
  mount.mkdir()
  workdir = mount / "run"
  p = run_train_in_tmpfs(mount, workdir, size="1m", read_only=True)
  line = assert_failed_at_startup(p, workdir, "Read-only file system")
  print(line)


def test_full_disk_fails_at_startup_naming_the_path(tmp_path):
  mount = tmp_path / "full"
  mount.mkdir()
  workdir = mount / "run"
  p = run_train_in_tmpfs(mount, workdir, size="1m", fill=True)
  line = assert_failed_at_startup(p, workdir, "No space left on device")
  assert "free space there" in line
  print(line)


def test_workdir_under_a_regular_file(tmp_path):
  (tmp_path / "file").write_text("")
  workdir = tmp_path / "file" / "run"
  with pytest.raises(NotADirectoryError) as e:
    Workdir(workdir).create()
  assert e.value.errno == errno.ENOTDIR
  assert str(e.value).startswith(f"{workdir}: cannot write to the workdir (Not a directory); "), str(e.value)
  assert "\n" not in str(e.value)
  with pytest.raises(FileExistsError, match="is a file, not a directory"):
    Workdir(tmp_path / "file").create()
  print(e.value)


def test_create_leaves_nothing_behind(tmp_path):
  Workdir(tmp_path / "a" / "b").create()
  assert os.listdir(tmp_path / "a" / "b") == []


def test_free_space_check_names_the_path_and_both_sizes(tmp_path):
  wd = Workdir(tmp_path / "run")  # not created yet: its nearest existing parent's disk is measured
  free = shutil.disk_usage(tmp_path).free
  wd.check_free_space(1, "one checkpoint of the train state")
  with pytest.raises(OSError) as e:
    wd.check_free_space(free + 10**12, "one checkpoint of the train state")
  assert e.value.errno == errno.ENOSPC
  message = str(e.value)
  assert message.startswith(f"{tmp_path / 'run'}: not enough free space for one checkpoint of the train state: ")
  assert " GB free on its disk, " in message and " needed; " in message and "\n" not in message
  Workdir("gs://some-bucket/run").check_free_space(10**18, "anything")  # buckets are not measured


def test_free_space_check_on_a_small_disk(tmp_path):
  mount = tmp_path / "small"
  mount.mkdir()
  code = textwrap.dedent("""
    import sys
    from kimi_jax.checkpoint.workdir import Workdir
    try:
      Workdir(sys.argv[1]).check_free_space(3_000_000, "one checkpoint of the train state")
    except OSError as e:
      print(type(e).__name__, e.errno, e)
  """)
  p = run_in_tmpfs(mount, 'exec "$@"', sys.executable, "-c", code, str(mount / "run"), size="1m", env=env())
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.strip() == (
    f"OSError {errno.ENOSPC} {mount / 'run'}: not enough free space for one checkpoint of the train state: "
    "1.0 MB free on its disk, 3.0 MB needed; free space there or give a --workdir on another disk"
  ), p.stdout
  print(p.stdout.strip())


def test_disk_too_small_for_one_checkpoint_fails_before_the_model_is_built(tmp_path):
  """The trainer measures one checkpoint of the run (params, router biases, optimizer state) from shapes alone and
  stops at start-up when the workdir's disk has less free; 1 MB does not hold this model's ~4 MB."""
  mount = tmp_path / "small"
  mount.mkdir()
  workdir = mount / "run"
  p = run_train_in_tmpfs(mount, workdir, size="1m")
  assert p.returncode != 0, p.stdout[-2000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith(f"OSError: {workdir}: not enough free space for one checkpoint of the run: "), last
  assert "kimi-jax train:" not in p.stdout, p.stdout
  print(last)


def test_failed_async_save_surfaces_at_the_next_save_naming_its_step(tmp_path):
  """Orbax writes the arrays in a background thread; its failure comes back from the next save (or `wait`)."""
  mount = tmp_path / "small"
  mount.mkdir()
  code = textwrap.dedent("""
    import sys
    import numpy as np
    from kimi_jax.checkpoint.manager import TrainCheckpointer

    ckpt = TrainCheckpointer(sys.argv[1], keep=3)
    small = {"w": np.ones(8, np.float32)}
    big = {"w": np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)}  # 4 MB, incompressible
    ckpt.save(1, small, small, {"i": 1})
    ckpt.save(2, big, big, {"i": 2})  # returns: the arrays are written in the background
    try:
      ckpt.save(3, small, small, {"i": 3})
    except OSError as e:
      print("ERROR", type(e).__name__, e.errno, e)
    ckpt.close()
    print("STEPS", ckpt.all_steps())
  """)
  p = run_in_tmpfs(mount, 'exec "$@"', sys.executable, "-c", code, str(mount / "run"), size="2m", env=env())
  assert p.returncode == 0, p.stderr[-3000:]
  error = line_with(p.stdout, "ERROR")
  assert error == (
    f"ERROR OSError {errno.ENOSPC} {mount / 'run' / 'checkpoints' / '2'}: saving the checkpoint of step 2 failed "
    "(No space left on device); the checkpoints up to step 1 are intact: free space on that disk and rerun the "
    "same command to resume from step 1"
  ), p.stdout + p.stderr[-3000:]
  assert line_with(p.stdout, "STEPS") == "STEPS [1]"
  print(error)


def test_checkpoint_that_does_not_fit_fails_at_its_save_and_resumes_after_freeing_space(tmp_path):
  """Steps 2 and 4 are saved; the disk holds one checkpoint (plus what start-up writes), not two: the save of step 4
  fails naming its directory, step 2 stays, and once the disk is grown the same command resumes from step 2."""
  mount, logs = tmp_path / "small", tmp_path / "logs"
  mount.mkdir()
  logs.mkdir()
  workdir = mount / "run"
  script = textwrap.dedent("""
    cd "$REPO"
    "$@" > "$LOGS/first.out" 2> "$LOGS/first.err"
    echo $? > "$LOGS/first.rc"
    ls "$MNT/run/checkpoints" > "$LOGS/first.ls"
    mount -o remount,size=64m "$MNT" || exit 98
    exec "$@"
  """)
  cache = {  # the rerun reuses the first run's compiled step
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }
  p = run_in_tmpfs(
    mount,
    script,
    *train_command(workdir),
    "--config.steps=4",
    "--config.checkpoint_every=2",
    size="6m",
    env=env(REPO=str(REPO), LOGS=str(logs), **cache),
  )
  first_err = (logs / "first.err").read_text()
  assert (logs / "first.rc").read_text().strip() != "0", (logs / "first.out").read_text()[-2000:]
  line = line_with(first_err, f"{workdir / 'checkpoints' / '4'}: saving the checkpoint of step 4 failed")
  assert line is not None, first_err[-3000:]
  assert line.endswith(
    f"{workdir / 'checkpoints' / '4'}: saving the checkpoint of step 4 failed (No space left on device); "
    "the checkpoints up to step 2 are intact: free space on that disk and rerun the same command to resume from "
    "step 2"
  ), line
  assert "2" in (logs / "first.ls").read_text().split()
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resuming at step 2" in p.stdout, p.stdout[-2000:]
  print(line)
