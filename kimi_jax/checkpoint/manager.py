"""Training checkpoints: model state (params + router biases), optimizer state, data-iterator state and step,
saved together by an Orbax CheckpointManager under `WORKDIR/checkpoints/<step>/`.

Orbax writes each step to a temporary directory and renames it when complete, so a kill during a save leaves
the previous checkpoint usable.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class TrainCheckpointer:
  def __init__(self, workdir: str, *, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "opt_state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, opt_state: Any, data_state: dict) -> None:
    """Starts an async save; call `wait()` before exiting."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), opt_state=ocp.args.StandardSave(opt_state),
        data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, abstract_state: Any, abstract_opt_state: Any) -> tuple[Any, Any, dict]:
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), opt_state=ocp.args.StandardRestore(abstract_opt_state),
        data=ocp.args.JsonRestore()))
    return out.state, out.opt_state, out.data

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    """Only the model state (for inference)."""
    out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return out.state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
