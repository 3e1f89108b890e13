"""A training run's directory, on local disk or in a bucket (gs://...): what lives where, and how it is written.

    WORKDIR/run_config.json     {"model": ModelConfig dict, "train": run config}; one architecture per workdir
    WORKDIR/checkpoints/<step>/ Orbax CheckpointManager (kimi_jax.checkpoint.manager.TrainCheckpointer)
    WORKDIR/metrics.jsonl       one JSON object per logged step
    WORKDIR/tensorboard/        TensorBoard event files
    WORKDIR/profile/            jax.profiler traces of config.profile_steps (TensorBoard's profile plugin, XProf)

Paths go through etils.epath, which Orbax uses too: local paths are plain files, gs:// goes through gcsfs (JSON
API) and Orbax's arrays through tensorstore's gcs driver. Both honour the standard emulator variables
(STORAGE_EMULATOR_HOST; TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING), which is how the tests run
against a local GCS server. Nothing here calls os.path/open/os.makedirs on something that may be a URL.

Object storage has no append and no cheap small writes, so the two growing logs are buffered:
- metrics.jsonl is appended to in place locally; on a bucket the whole object is rewritten from an in-memory copy
  at most every `flush_every_s` seconds, at each checkpoint save and at close (each upload costs the whole file:
  ~1 KiB a logged step, so a 10,000-row log is a ~10 MB upload every half minute — cheap next to a checkpoint).
- TensorBoard events are written to a local temporary directory and copied up at the same moments.
A run killed between flushes loses at most the rows after the last one; rows logged after the checkpoint a run
resumes from are dropped on resume anyway (they are re-logged), so metrics.jsonl always matches the checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
from typing import Any

from etils import epath

from kimi_jax.config import ModelConfig

RUN_CONFIG_FILE = "run_config.json"
# A model checkpoint directory (model_io, the converters): the model config and the Orbax state beside it.
CONFIG_FILE = "config.json"
STATE_DIR = "state"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PROFILE_DIR = "profile"


def is_url(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """An absolute epath.Path: URLs as given, local paths made absolute (Orbax wants absolute directories)."""
  path = os.fspath(path)
  return epath.Path(path if is_url(path) else os.path.abspath(path))


LOGIN_FIX = (
  "run `gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS to a key file); on "
  "a Cloud TPU / GCE VM, the VM's service account is used"
)
_checked: set[tuple[str, bool]] = set()  # (bucket, write) pairs already found reachable by this process


def check_bucket(path: str | os.PathLike, *, write: bool = False) -> None:
  """For gs:// paths: fail early, in one line naming the URL and the fix, when the bucket is missing, no credentials
  are found, or they may not read (or, with `write`, write) there. Otherwise the first symptom is gcsfs's error
  naming only a JSON API upload URL, or tensorstore's from an Orbax background save thread, minutes in.

  Both clients are asked, since both are used and each finds credentials on its own: gcsfs (etils.epath: small
  files) whether the bucket exists, tensorstore (Orbax's array data) to read a key under `path`; with `write`, each
  writes and deletes a probe object there. Done once per bucket and mode per process."""
  path = os.fspath(path)
  if not path.startswith("gs://"):
    return
  bucket, _, prefix = path[len("gs://") :].partition("/")
  if (bucket, write) in _checked or (bucket, True) in _checked:
    return
  try:
    exists = epath.Path(f"gs://{bucket}").exists()
  except ImportError as e:
    raise ImportError(f"{path}: gs:// paths need gcsfs (pip install gcsfs)") from e
  except Exception as e:  # credentials, permissions, network: gcsfs/google-auth raise many types
    raise storage_error(path, e) from e
  if not exists:
    raise FileNotFoundError(
      f"{path}: bucket gs://{bucket} does not exist or these credentials cannot see it; "
      f"create it (`gcloud storage buckets create gs://{bucket}`), fix the URL, or log in "
      "(`gcloud auth application-default login`)"
    )
  probe = "/".join(filter(None, [prefix.strip("/"), f".kimi-jax-access-check-{os.getpid()}-{time.time_ns()}"]))
  try:
    import tensorstore as ts

    store = ts.KvStore.open({"driver": "gcs", "bucket": bucket}).result()
    if write:
      store.write(probe, b"").result()
      store.write(probe, None).result()
      (epath.Path(f"gs://{bucket}") / probe).write_text("")
      (epath.Path(f"gs://{bucket}") / probe).unlink()
    else:
      store.read(probe).result()
  except Exception as e:
    raise storage_error(path, e, write=write) from e
  _checked.add((bucket, write))


def storage_error(path: str, e: BaseException, *, write: bool = False) -> Exception:
  """`e` (from gcsfs, google-auth or tensorstore, reaching gs://`path`) as one line naming the URL and the fix."""
  text, bucket = str(e), path[len("gs://") :].split("/", 1)[0]
  cause = first_line(e).split(" [http_response_body=")[0][:300]  # tensorstore appends the whole response
  if (
    any(
      s in text
      for s in (
        "401",
        "UNAUTHENTICATED",
        "Anonymous caller",
        "nvalid Credentials",
        "credentials file",
        "DefaultCredentialsError",
      )
    )
    or type(e).__name__ == "DefaultCredentialsError"
  ):
    return PermissionError(f"{path}: no usable credentials for gs://{bucket} ({cause}); {LOGIN_FIX}")
  if any(s in text for s in ("403", "PERMISSION_DENIED", "Forbidden", "does not have storage.")):
    role = "roles/storage.objectAdmin" if write else "roles/storage.objectViewer"
    return PermissionError(
      f"{path}: permission denied on gs://{bucket} ({cause}); grant this account {role} on the "
      f"bucket (`gcloud storage buckets add-iam-policy-binding gs://{bucket} --member=ACCOUNT "
      f"--role={role}`) or log in as another (`gcloud auth application-default login`)"
    )
  return RuntimeError(
    f"{path}: cannot reach bucket gs://{bucket} ({type(e).__name__}: {cause}); check the network "
    "and `gcloud auth application-default login`"
  )


def write_text_atomically(path: epath.Path, text: str) -> None:
  """Readers (other processes, a rerun after a kill) see the old text or the new, never half a file."""
  if is_url(path):  # an object appears whole or not at all
    path.write_text(text)
    return
  tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
  tmp.write_text(text)
  tmp.replace(path)


def list_dir(path: epath.Path) -> list[epath.Path]:
  """The entries of `path` as they are now. For gs://, gcsfs (behind epath) keeps a listing cached for the life of
  the process, which would hide objects other processes (hosts) wrote since; that cache is dropped first."""
  fs = getattr(getattr(path, "_backend", None), "fs", None)  # epath's fsspec backend (private, hence getattr)
  if is_url(path) and fs is not None:
    fs(path).invalidate_cache(os.fspath(path))
  return list(path.iterdir())


def first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [""])[0]


def os_error(err: int | None, message: str) -> OSError:
  """An OSError carrying `err` as its errno and of the subclass Python gives that errno (PermissionError for
  EACCES, NotADirectoryError for ENOTDIR, ...), whose text is `message` alone (no "[Errno N]" prefix)."""
  cls = type(OSError(err, "")) if err else OSError
  e = cls(message)
  e.errno = err
  return e


def human_bytes(n: float) -> str:
  for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{int(n)} bytes"


_WORKDIR_FIXES = {
  errno.EROFS: "it is on a read-only file system: give a --workdir on a writable disk (or remount it read-write)",
  errno.EACCES: "this user may not write there: fix the directory's owner or permissions, or give another --workdir",
  errno.EPERM: "this user may not write there: fix the directory's owner or permissions, or give another --workdir",
  errno.ENOSPC: "its disk is full: free space there or give a --workdir on another disk",
  errno.EDQUOT: "the disk quota is used up: free space there or give a --workdir on another disk",
  errno.ENOTDIR: "part of that path is a file, not a directory: give another --workdir",
  errno.EEXIST: "it is a file, not a directory: give another --workdir",
}


def unwritable_workdir_error(path: str, e: OSError) -> OSError:
  """`e`, met creating or writing to the local workdir `path`, as one line naming the path, the reason and the fix
  (an OSError of the same errno)."""
  fix = _WORKDIR_FIXES.get(e.errno, "check the path or give another --workdir")
  return os_error(e.errno, f"{path}: cannot write to the workdir ({e.strerror or first_line(e)}); {fix}")


class Workdir:
  """The layout of one training run's directory; `url` is a local path or a gs:// URL."""

  def __init__(self, url: str | os.PathLike):
    self.url = os.fspath(url)
    self.root = as_path(url)

  def __str__(self) -> str:
    return self.url

  @property
  def remote(self) -> bool:
    return is_url(self.url)

  @property
  def run_config_path(self) -> epath.Path:
    return self.root / RUN_CONFIG_FILE

  @property
  def checkpoints(self) -> epath.Path:
    return self.root / CHECKPOINTS_DIR

  @property
  def metrics_path(self) -> epath.Path:
    return self.root / METRICS_FILE

  @property
  def tensorboard(self) -> epath.Path:
    return self.root / TENSORBOARD_DIR

  @property
  def profile(self) -> epath.Path:
    return self.root / PROFILE_DIR

  def create(self) -> None:
    """Make the directory and prove it takes a write (local), or check that its bucket exists and takes one (object
    storage has no directories). A read-only, full or forbidden local workdir fails here, in one line naming the
    path, the reason and the fix, rather than at the first checkpoint (an OSError of the failure's errno)."""
    check_bucket(self.url, write=True)
    if self.remote:
      return
    # Some bytes, synced: an empty file fits on a full disk, and some file systems report ENOSPC only at fsync.
    probe = os.path.join(self.root, f".kimi-jax-write-check-{os.getpid()}-{time.time_ns()}")
    try:
      self.root.mkdir(parents=True, exist_ok=True)
      with open(probe, "wb") as f:
        f.write(b"\0" * 4096)
        f.flush()
        os.fsync(f.fileno())
      os.remove(probe)
    except OSError as e:
      with contextlib.suppress(OSError):
        os.remove(probe)
      raise unwritable_workdir_error(os.fspath(self.root), e) from e

  def check_free_space(self, needed_bytes: int, what: str) -> None:
    """For a local workdir: fail now, naming the path and both sizes, when its disk has less than `needed_bytes`
    free for `what` (e.g. one checkpoint of the train state) — not at the save, hours in. No-op for gs://."""
    if self.remote:
      return
    existing = self.root
    while not existing.exists() and existing.parent != existing:  # before create(): the disk it will be on
      existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
      raise os_error(
        errno.ENOSPC,
        f"{self.root}: not enough free space for {what}: {human_bytes(free)} free on its disk, "
        f"{human_bytes(needed_bytes)} needed; free space there or give a --workdir on another disk",
      )

  def is_run(self) -> bool:
    """Whether this is a training workdir (it has run_config.json)."""
    return self.run_config_path.exists()

  def read_run_config(self) -> dict[str, Any] | None:
    return json.loads(self.run_config_path.read_text()) if self.is_run() else None

  def model_config(self) -> ModelConfig:
    """The architecture this workdir was trained with."""
    run = self.read_run_config()
    if run is None:
      raise FileNotFoundError(f"{self.url} is not a training workdir (no {RUN_CONFIG_FILE})")
    return ModelConfig.from_dict(run["model"])

  def check_architecture(self, cfg: ModelConfig) -> None:
    """A workdir belongs to one architecture: refuse to resume a checkpoint of another config."""
    run = self.read_run_config()
    if run is None:
      return
    saved = ModelConfig.from_dict(run["model"]).architecture()
    diff = {k: (saved[k], v) for k, v in cfg.architecture().items() if saved.get(k) != v}
    if diff:
      changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
      raise ValueError(
        f"{self.url} holds a checkpoint of another model config ({changes}); use a new --workdir or the original config"
      )

  def write_run_config(self, cfg: ModelConfig, train_config: dict[str, Any]) -> None:
    # Other processes may be reading it (check_architecture) while process 0 writes it.
    write_text_atomically(
      self.run_config_path, json.dumps({"model": cfg.to_dict(), "train": train_config}, indent=2, default=str)
    )

  def checkpointer(self, *, keep: int, keep_period: int | None = None):
    from kimi_jax.checkpoint.manager import TrainCheckpointer

    return TrainCheckpointer(self.url, keep=keep, keep_period=keep_period)

  def latest_model_state(self) -> tuple[ModelConfig, epath.Path]:
    """(model config, Orbax item dir of the model state) of the latest checkpoint."""
    cfg = self.model_config()
    ckpt = self.checkpointer(keep=1)
    step = ckpt.latest_step()
    ckpt.close()
    if step is None:
      raise FileNotFoundError(f"{self.url}: training workdir without checkpoints (nothing in {self.checkpoints})")
    return cfg, self.checkpoints / str(step) / "state"

  def read_metrics(self) -> list[dict[str, Any]]:
    if not self.metrics_path.exists():
      return []
    lines = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        if i < len(lines) - 1:
          raise ValueError(f"{self.metrics_path}: line {i + 1} is not JSON") from None
        # a local append cut short by a kill: that step is re-logged after the resume
    return rows

  def metrics_log(self, *, resume_step: int, flush_every_s: float = 30.0) -> MetricsLog:
    return MetricsLog(self, resume_step=resume_step, flush_every_s=flush_every_s)

  def events_dir(self, *, flush_every_s: float = 30.0) -> EventsDir:
    return EventsDir(self, flush_every_s=flush_every_s)


class MetricsLog:
  """WORKDIR/metrics.jsonl, kept consistent with the checkpoints: rows after `resume_step` (logged by a run that
  was killed before its next checkpoint) are dropped, since the resumed run logs those steps again."""

  def __init__(self, workdir: Workdir, *, resume_step: int, flush_every_s: float):
    self._path = workdir.metrics_path
    self._remote = workdir.remote
    self._flush_every_s = flush_every_s
    rows = [r for r in workdir.read_metrics() if r["step"] <= resume_step]
    self._lines = [json.dumps(r) + "\n" for r in rows]
    self._dirty = True  # the file may hold rows past resume_step: rewrite it once
    self._flushed_at = 0.0
    self.flush(force=True)

  def append(self, row: dict[str, Any]) -> None:
    line = json.dumps(row) + "\n"
    self._lines.append(line)
    if not self._remote:  # a local file can be appended to: every row is on disk at once
      with self._path.open("a") as f:
        f.write(line)
      return
    self._dirty = True
    self.flush()

  def flush(self, force: bool = False) -> None:
    """Writes the whole log (object storage cannot append), at most every flush_every_s unless `force`."""
    if not self._dirty or (not force and time.monotonic() - self._flushed_at < self._flush_every_s):
      return
    write_text_atomically(self._path, "".join(self._lines))
    self._dirty, self._flushed_at = False, time.monotonic()


class EventsDir:
  """Where a TensorBoard writer should put its event files: WORKDIR/tensorboard itself when local; for a bucket a
  local temporary directory whose files `flush()` copies up (TensorBoard's own GCS writers need TensorFlow or fail
  at close)."""

  def __init__(self, workdir: Workdir, *, flush_every_s: float):
    self._remote_dir = workdir.tensorboard if workdir.remote else None
    self._flush_every_s = flush_every_s
    self._flushed_at = time.monotonic()
    if self._remote_dir is None:
      workdir.tensorboard.mkdir(parents=True, exist_ok=True)
      self.local = os.fspath(workdir.tensorboard)
    else:
      self.local = tempfile.mkdtemp(prefix="kimi-jax-tensorboard-")

  def due(self) -> bool:
    """Whether a `flush()` would copy anything now (the caller flushes its writer first)."""
    return self._remote_dir is not None and time.monotonic() - self._flushed_at >= self._flush_every_s

  def flush(self, force: bool = False) -> None:
    """Copies the local event files up (whole files: the objects are replaced), at most every flush_every_s."""
    if self._remote_dir is None or not (force or self.due()):
      return
    for name in sorted(os.listdir(self.local)):
      (self._remote_dir / name).write_bytes((epath.Path(self.local) / name).read_bytes())
    self._flushed_at = time.monotonic()

  def close(self) -> None:
    """Final upload and removal of the temporary directory; call after the writer is closed."""
    if self._remote_dir is not None:
      self.flush(force=True)
      shutil.rmtree(self.local, ignore_errors=True)
