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
"""

from __future__ import annotations

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

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, opt_state: Any, data_state: dict) -> None:
    """Starts an async save; call `wait()` before exiting."""
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        opt_state=ocp.args.StandardSave(opt_state),
        data=ocp.args.JsonSave(data_state),
      ),
    )

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
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
