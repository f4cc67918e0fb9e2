"""Checkpoints through orbax's CheckpointManager: async saves, retention, exact resume.

A checkpoint at step s holds the train state after s updates, the data iterator's
state (so the stream continues with exactly the batches that would have come next)
and the resolved run config. Orbax writes to a temporary directory and renames it
when complete, so a crash at any moment leaves the last complete checkpoint readable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from metatrain.config import CheckpointConfig
from metatrain.train.state import TrainState


class Checkpointer:
    """Saves and restores (train state, data state, config) under `WORKDIR/checkpoints`."""

    def __init__(self, workdir: Path, config: CheckpointConfig):
        self.directory = (workdir / "checkpoints").resolve()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=config.keep,
                enable_async_checkpointing=config.async_save,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict, config: dict) -> None:
        """Start saving (returns before the write finishes when async)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict, dict]:
        """Restore into `abstract_state`'s shapes and shardings (any mesh)."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["data"], restored["config"]

    def restore_config(self, step: int) -> dict[str, Any]:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored["config"]

    def reached_preemption(self, step: int) -> bool:
        """True on every process at the step they agreed to stop at after a SIGTERM."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
