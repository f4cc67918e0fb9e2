"""Checkpoints: the one home of their layout, through orbax's CheckpointManager.

    WORKDIR/checkpoints/<step>/state    train state after `step` updates (orbax StandardSave)
    WORKDIR/checkpoints/<step>/data     the data iterator's state (JSON)
    WORKDIR/checkpoints/<step>/config   the resolved run config (JSON)

Orbax writes each checkpoint into a temporary directory and renames it when complete,
so a crash at any moment leaves the last complete checkpoint readable. A checkpoint
that is complete but damaged afterwards (a truncated, zeroed or missing file) fails to
restore: `restore_latest` reports it in one line, moves it aside to
`<step>.corrupt-<time>` (never deletes it) and falls back to the next newest one.
Readers (`metatrain.run.reader`: generation, serving, evaluation, export) open the
directory read-only: they skip a damaged checkpoint the same way but leave it where it is.

In a bucket (`gs://`) orbax writes each checkpoint in place and marks it complete with
`commit_success.txt` (object storage has no rename); an incomplete one is never listed.

With several processes every process restores its own shards; they agree on each
attempt (one failing process makes it fail for all), so they all fall back together.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from metatrain.config import CheckpointConfig
from metatrain.errors import FaultError, UserError, describe_cause, is_out_of_memory
from metatrain.io.storage import absolute, join, move_tree
from metatrain.run.layout import CHECKPOINTS_DIR
from metatrain.run.state import TrainState

#: Items of every checkpoint (the layout above).
STATE_ITEM, DATA_ITEM, CONFIG_ITEM = "state", "data", "config"

#: Listings a reader tries when each changes under its read (a trainer deleting what it listed).
RELISTS: int = 20
#: Listings a reader tries, 0.1 s apart, when a directory lists no checkpoint at all.
EMPTY_RELISTS: int = 5
_RELIST = object()  # `_newest_that_reads`: the listing changed, list again


def split_step_dir(path: Path, *, must_exist: bool = True) -> tuple[Path, int] | None:
    """`(workdir, step)` of a step directory `WORKDIR/checkpoints/<step>` (one that exists,
    unless not `must_exist`), else None."""
    path = absolute(path)
    if path.name.isdigit() and path.parent.name == CHECKPOINTS_DIR and (path.is_dir() or not must_exist):
        return path.parent.parent, int(path.name)
    return None


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `restore_latest` found: the step, train state, data state and stored config."""

    step: int
    state: Any
    data_state: dict
    config: dict


def _report(message: str) -> None:
    if jax.process_index() == 0:
        print(f"metatrain: {message}", file=sys.stderr, flush=True)


def _all_processes_ok(ok: bool) -> bool:
    """True when `ok` holds on every process (collective with several processes)."""
    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


class Checkpointer:
    """Saves and restores (train state, data state, config) under `WORKDIR/checkpoints`.

    Args:
        workdir: the run's work directory.
        config: retention and async saving (None: the defaults).
        read_only: open for reading only (nothing is created, saved, moved or deleted).
    """

    def __init__(self, workdir: Path, config: CheckpointConfig | None = None, *, read_only: bool = False):
        config = config or CheckpointConfig()
        self.directory = absolute(join(workdir, CHECKPOINTS_DIR))
        self.read_only = read_only
        keep: dict[str, Any] = {"max_to_keep": None if read_only else config.keep}
        if config.keep_steps and not read_only:  # the newest `keep`, and `keep_steps` whatever their age
            keep = {"preservation_policy": preservation.AnyPreservationPolicy([
                preservation.LatestN(n=config.keep), preservation.CustomSteps(steps=list(config.keep_steps))])}
        options = ocp.CheckpointManagerOptions(
            **keep,
            enable_async_checkpointing=config.async_save and not read_only,
            create=False,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        for attempt in range(RELISTS):
            try:
                self._manager = ocp.CheckpointManager(self.directory, options=options)
                break
            except FileNotFoundError:
                # The manager lists the steps, then reads each one's time: a trainer that keeps
                # few checkpoints may delete one in between. List again.
                if attempt == RELISTS - 1:
                    raise
        self._pending_step: int | None = None  # an async save not yet known to be complete

    # -- what is there ------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    # -- saving -------------------------------------------------------------------------
    def save(self, step: int, state: TrainState, data_state: dict, config: dict) -> None:
        """Start saving (returns before the write finishes when async).

        Raises:
            FaultError: this or the previous (async) save failed; the message names the
                directory, the cause and the newest complete checkpoint, which stays.
        """
        self.wait()
        if jax.process_index() == 0 and not self.read_only:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise self._save_fault(step, e) from None
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(**{
                    STATE_ITEM: ocp.args.StandardSave(state),
                    DATA_ITEM: ocp.args.JsonSave(data_state),
                    CONFIG_ITEM: ocp.args.JsonSave(config),
                }),
                force=True,
            )
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds; all mean "not saved"
            raise self._save_fault(step, e) from e
        self._pending_step = step

    def wait(self) -> None:
        """Wait for an async save to finish.

        Raises:
            FaultError: it failed (disk full, read-only filesystem, ...).
        """
        step, self._pending_step = self._pending_step, None
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._save_fault(step, e) from e

    def _save_fault(self, step: int | None, error: BaseException) -> FaultError:
        try:
            self._manager.reload()
            kept = self.latest_step()
        except Exception:  # noqa: BLE001 - the directory itself may be what failed
            kept = None
        at = f" at step {step}" if step is not None else ""
        keeps = (
            f"the last complete checkpoint (step {kept}) is kept; fix the cause and run the same command to resume from it"
            if kept is not None
            else "no complete checkpoint exists yet; fix the cause and run the same command again"
        )
        return FaultError(f"saving the checkpoint{at} in {self.directory} failed: {describe_cause(error)}; {keeps}")

    # -- restoring ------------------------------------------------------------------------
    def read_config(self, step: int) -> dict[str, Any]:
        """The run config stored with checkpoint `step` (raises whatever orbax raises)."""
        restored = self._manager.restore(step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
        config = restored[CONFIG_ITEM]
        if not isinstance(config, dict) or "model" not in config:
            raise ValueError("its config item holds no run config")
        return config

    def restore_latest(
        self,
        abstract_state: TrainState,
        validate: Callable[[int, dict], None] | None = None,
    ) -> Restored | None:
        """The newest checkpoint that restores, into `abstract_state`'s shapes and shardings.

        A checkpoint that fails to restore is reported in one line, moved aside (read
        only: skipped) and the next newest is tried.

        Args:
            abstract_state: ShapeDtypeStructs with shardings (any mesh).
            validate: `validate(step, stored_config)` before the state is read; it raises
                (a `UserError`) to refuse the resume, which is passed on as it is.

        Returns:
            None when the directory holds no checkpoint.

        Raises:
            FaultError: there are checkpoints, but none restores.
        """

        return self._first_intact(lambda step: self._read_whole(step, abstract_state, validate))

    def _read_whole(self, step: int, abstract_state: TrainState,
                    validate: Callable[[int, dict], None] | None) -> Restored:
        config = self.read_config(step)
        if validate is not None:
            validate(step, config)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                DATA_ITEM: ocp.args.JsonRestore(),
            }),
        )
        if not isinstance(restored[DATA_ITEM], dict):
            raise ValueError("its data item holds no data state")
        return Restored(step, restored[STATE_ITEM], restored[DATA_ITEM], config)

    def restore_step(
        self,
        step: int,
        abstract_state: TrainState,
        validate: Callable[[int, dict], None] | None = None,
    ) -> Restored:
        """Checkpoint `step` whole (train state, data state, config), into `abstract_state`'s
        shapes and shardings: where a cooldown branch starts (`checkpoint.branch_from`).

        Raises:
            UserError: no checkpoint at `step`, or `validate` refuses it.
            FaultError: it is there but does not restore.
        """
        steps = self.all_steps()
        if step not in steps:
            have = ", ".join(map(str, steps)) or "none"
            raise UserError(f"{self.directory} has no checkpoint at step {step} (checkpoints: {have}); branch from "
                            "one it keeps (a stable run keeps the steps in its checkpoint.keep_steps)")
        try:
            return self._read_whole(step, abstract_state, validate)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds; all mean "does not restore"
            raise FaultError(f"checkpoint {self.step_dir(step)} cannot be restored: {describe_cause(e)}") from None

    def restore_params(
        self, abstract_params: Callable[[dict, Path], Any], step: int | None = None
    ) -> tuple[int, Any, dict]:
        """Only the parameters (no optimizer moments are read), with the stored config.

        Args:
            abstract_params: `abstract_params(stored_config, step_dir)` gives the
                ShapeDtypeStructs (with shardings) of the `params` subtree.
            step: this checkpoint only; None: the newest one that restores.

        Raises:
            UserError: there is no checkpoint (or no complete checkpoint `step`: the
                message names the steps there are).
            FaultError: the checkpoint (every checkpoint, for `step=None`) fails to restore.
        """

        def read(s: int) -> tuple[int, Any, dict]:
            config = self.read_config(s)
            target = abstract_params(config, self.step_dir(s))
            restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
            state = ocp.args.PyTreeRestore(
                item={"params": target}, restore_args={"params": restore_args}, partial_restore=True
            )
            restored = self._manager.restore(s, args=ocp.args.Composite(**{STATE_ITEM: state}))
            return s, restored[STATE_ITEM]["params"], config

        if step is not None:
            steps = self.all_steps()
            if step not in steps:
                have = ", ".join(map(str, steps)) or "none"
                raise UserError(f"--step {step}: {self.directory.parent} has no checkpoint at step {step} (checkpoints: {have})")
            try:
                return read(step)
            except Exception as e:  # noqa: BLE001
                if self._listing_changed(steps) and step not in self.all_steps():
                    raise UserError(
                        f"checkpoint {self.step_dir(step)} was deleted while it was read (its trainer keeps only "
                        f"its newest checkpoints, now {', '.join(map(str, self.all_steps())) or 'none'}): "
                        "read the newest with --workdir alone, or a step the run keeps"
                    ) from None
                raise FaultError(f"checkpoint {self.step_dir(step)} cannot be restored: {describe_cause(e)}") from None
        found = self._first_intact(read)
        if found is None:
            raise UserError(f"no checkpoint in {self.directory}; train first with `metatrain train --workdir {self.directory.parent}`")
        return found

    def _first_intact(self, read: Callable[[int], Any]) -> Any:
        """`read(step)` of the newest step for which it succeeds on every process.

        A step whose read fails while the listing changed under it (a trainer with a
        small `checkpoint.keep` saved a newer one and deleted it) is not damage: the
        steps are listed again and the newest not yet tried is read. Only a checkpoint
        that is still listed and fails to restore is reported (and, unless read-only,
        moved aside).
        """
        damaged: dict[int, str] = {}
        for _ in range(RELISTS):
            if self.read_only and not self.all_steps() and self.directory.is_dir():
                # A trainer keeping one checkpoint may have removed the old one before its
                # new one is listed: look again briefly before saying there is none.
                for _ in range(EMPTY_RELISTS):
                    time.sleep(0.1)
                    self._manager.reload()
                    if self.all_steps():
                        break
            if not self.all_steps() and not damaged:
                aside = sorted(p.name for p in self.directory.glob("*.corrupt-*")) if self.directory.is_dir() else []
                if aside and not self.read_only:
                    raise FaultError(
                        f"{self.directory} holds only damaged checkpoints, set aside earlier ({', '.join(aside)}); "
                        "nothing to resume from, and starting over here would mix two runs. Train in another "
                        "--workdir, or remove them to start this one over"
                    )
                return None
            found = self._newest_that_reads(read, damaged)
            if found is not _RELIST:
                return found
        raise UserError(
            f"the checkpoints in {self.directory} were replaced faster than they could be read "
            f"({RELISTS} listings in a row changed while reading): its trainer keeps too few of them. "
            "Read it when training has stopped, or train it with a larger checkpoint.keep"
        )

    def _newest_that_reads(self, read: Callable[[int], Any], damaged: dict[int, str]) -> Any:
        """`read` of the newest listed step (not in `damaged`) that restores; `_RELIST` when
        the listing changed under a failed read; records each damaged step in `damaged`.

        Raises:
            FaultError: no step restores and none vanished (every damage named).
        """
        listed = self.all_steps()
        for step in reversed([s for s in listed if s not in damaged]):
            error: BaseException | None = None
            try:
                result = read(step)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - truncated, zeroed and missing files fail differently
                if is_out_of_memory(e):  # says nothing about the checkpoint: never set it aside
                    raise
                error = e
            if _all_processes_ok(error is None):
                return result
            if self._listing_changed(listed):
                return _RELIST
            cause = describe_cause(error) if error is not None else "another process could not restore it"
            damaged[step] = self._set_aside(step, cause)
            listed = self.all_steps()  # without it, once moved aside
        raise FaultError(
            f"none of the {len(damaged)} checkpoints in {self.directory} can be restored "
            f"({'; '.join(damaged.values())}); nothing to resume from. Train in another --workdir, "
            "or restore the checkpoints from a backup"
        )

    def _listing_changed(self, steps: list[int]) -> bool:
        """Whether the complete checkpoints are no longer `steps` (on any process)."""
        try:
            self._manager.reload()
        except FileNotFoundError:  # a step vanished between orbax's listing and its look at it
            same = False
        else:
            same = self.all_steps() == steps
        return not _all_processes_ok(same)

    def _set_aside(self, step: int, cause: str) -> str:
        """Report checkpoint `step` as damaged; move it aside unless read-only."""
        path = self.step_dir(step)
        if self.read_only:
            _report(f"checkpoint {path} cannot be restored ({cause}); skipping it")
            return f"step {step}: {cause}"
        aside = path.parent / f"{step}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        if jax.process_index() == 0:
            move_tree(path, aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"metatrain-checkpoint-aside-{step}")
        self._manager.reload()
        _report(f"checkpoint {path} cannot be restored ({cause}); moved it aside to {aside.name}")
        return f"step {step}: {cause}, moved to {aside.name}"

    # -- the rest ---------------------------------------------------------------------------
    def reached_preemption(self, step: int) -> bool:
        """True on every process at the step they agreed to stop at after a SIGTERM."""
        return self._manager.reached_preemption(step)

    def close(self) -> None:
        """Wait for the last save (raising `FaultError` if it failed) and release orbax."""
        try:
            self.wait()
        finally:
            self._manager.close()
