"""Training checkpoints: model state (params + router biases), optimizer state, data-iterator state and step,
saved together by an Orbax CheckpointManager under `WORKDIR/checkpoints/<step>/`.

Saves are asynchronous (training continues while the arrays are written). Orbax writes each step to a temporary
directory and renames it when complete, so a kill during a save leaves the previous checkpoint usable and the
half-written one invisible to `latest_step`. Retention keeps the last `keep` checkpoints plus every step that
is a multiple of `keep_period` (for evaluating or branching from old points of a long run).

The workdir may be a local path or a gs:// URL (Orbax writes through etils.epath and tensorstore). On object
storage, where there is no atomic directory rename, Orbax marks a finished step with a commit_success.txt object
and ignores steps without one, so an interrupted upload never looks like a complete checkpoint.

Restores take abstract targets (ShapeDtypeStructs); with `sharding` set on them each host reads only its shards,
whatever mesh wrote the checkpoint. Leaves without a sharding that were saved on another topology land on one
device rather than failing.

A save that fails (a full disk, a file system gone read-only, a bucket that refuses the upload) raises one OSError
naming that step's directory, the reason and that the earlier checkpoints are intact. Orbax writes the arrays in a
background thread: an error there is kept and re-raised on the main thread by the next
`CheckpointManager.wait_until_finished()` (`_FinalizeThread.join`), which `save` of the next step and `wait` call;
tensorstore reports it as a ValueError ("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']"),
so the errno is read from the text when no OSError is in the chain.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from kimi_jax.checkpoint import workdir as workdir_lib


class TrainCheckpointer:
  def __init__(self, workdir: str, *, keep: int, keep_period: int | None = None):
    self.directory = workdir_lib.as_path(workdir) / workdir_lib.CHECKPOINTS_DIR  # an epath.Path
    policies = [pp.LatestN(n=keep)] + ([pp.EveryNSteps(keep_period)] if keep_period else [])
    options = ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=True, preservation_policy=pp.AnyPreservationPolicy(policies)
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "opt_state", "data"))
    self._in_flight: int | None = None  # the step whose async save `wait` would wait for
    self._failed = False  # a save failure was raised

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, opt_state: Any, data_state: dict) -> None:
    """Starts an async save; call `wait()` before exiting. Raises the failure of the previous save, if it failed
    (Orbax would raise it from here anyway), naming that step."""
    self.wait()
    try:
      self._manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          opt_state=ocp.args.StandardSave(opt_state),
          data=ocp.args.JsonSave(data_state),
        ),
      )
    except Exception as e:
      self._failed = True
      raise self._save_error(step, e) from e
    self._in_flight = step

  def restore(self, step: int, abstract_state: Any, abstract_opt_state: Any) -> tuple[Any, Any, dict]:
    fallback = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    out = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state, fallback_sharding=fallback),
        opt_state=ocp.args.StandardRestore(abstract_opt_state, fallback_sharding=fallback),
        data=ocp.args.JsonRestore(),
      ),
    )
    return out.state, out.opt_state, out.data

  def wait(self) -> None:
    """Blocks until the save in flight is written; raises its failure as one OSError naming its step."""
    step, self._in_flight = self._in_flight, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      self._failed = True
      raise self._save_error(step, e) from e

  def close(self) -> None:
    step = self._in_flight
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception as e:
        # Orbax may keep a second copy of a failure in its async checkpointer and raise it here again: once raised,
        # by `wait` or `save`, it is not raised twice.
        if not self._failed:
          raise self._save_error(step, e) from e

  def _save_error(self, step: int | None, e: Exception) -> Exception:
    """`e`, raised saving `step`, as one line: the step's directory, the reason, what is intact and what to do. An
    error that is not a storage one (a bug, a step saved twice) is returned as it is."""
    err, reason = _storage_failure(e)
    if reason is None:
      return e
    where = self.directory / str(step) if step is not None else self.directory
    # Orbax has dropped the failed step from its list by now, and deletes old steps only after a save completes.
    try:
      latest = self._manager.latest_step()
    except Exception:
      latest = None
    fix = _SAVE_FIXES.get(err, "fix that")
    if latest is not None:
      after = (
        f"the checkpoints up to step {latest} are intact: {fix} and rerun the same command to resume from step {latest}"
      )
    else:
      after = f"no earlier checkpoint was saved: {fix} and rerun the same command to start over"
    what = f"step {step}" if step is not None else "a step"
    return workdir_lib.os_error(err, f"{where}: saving the checkpoint of {what} failed ({reason}); {after}")


_SAVE_FIXES = {
  errno.ENOSPC: "free space on that disk",
  errno.EDQUOT: "free space on that disk (or raise the quota)",
  errno.EROFS: "make that disk writable",
  errno.EACCES: "restore write permission there",
  errno.EPERM: "restore write permission there",
}
# The codes tensorstore (Orbax's array writer) starts its errors with: "RESOURCE_EXHAUSTED: Error writing ...".
_TENSORSTORE_STATUS = re.compile(
  r"^(CANCELLED|UNKNOWN|DEADLINE_EXCEEDED|NOT_FOUND|ALREADY_EXISTS|PERMISSION_DENIED|RESOURCE_EXHAUSTED|"
  r"FAILED_PRECONDITION|ABORTED|INTERNAL|UNAVAILABLE|DATA_LOSS|UNAUTHENTICATED): "
)


def _storage_failure(e: BaseException) -> tuple[int | None, str | None]:
  """(errno or None, reason) when `e` or an exception it was raised from is a storage failure (an OSError, or
  tensorstore's ValueError carrying a status code and maybe the OS errno); (None, None) otherwise."""
  seen, found = set(), (None, None)
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno:
      return e.errno, e.strerror or workdir_lib.first_line(e)
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code:
      return int(code.group(1)), os.strerror(int(code.group(1)))
    if found == (None, None) and (isinstance(e, OSError) or _TENSORSTORE_STATUS.match(str(e))):
      found = (None, workdir_lib.first_line(e).split(" [http_response_body=")[0][:300])
    e = e.__cause__ or e.__context__
  return found
