"""The training loop: one jitted donating step that yields each step to its hooks.

    trainer = Trainer(config, workdir)
    for info in trainer.steps(state, start):   # one StepInfo per optimizer update
        trainer.hooks.run(info)                # metrics window, preemption, checkpoint, eval, yours

`Trainer.run()` is that loop, inside the work directory's lock, after a validated
restore. Everything with an effect is a hook with its own cadence (`metatrain.train.hooks`:
the `Hook` protocol and the trainer's hooks): the metrics window and its NaN check,
preemption, checkpoints, evaluation, a profile, and yours, after the built-in ones.

Evaluation (`Trainer.evaluate`) is the held-out split's loss, the same loss definition
as training (z-loss included), bits per byte of text (`eval/bpb/text`) and, with
`trainer.eval_ablation`, how much the thinking helps predict the text after it
(`eval/ablation/removed_minus_kept`, `metatrain.evaluation`).

Your own hooks: `Trainer(..., hooks=(FunctionHook(every=N, fn=f),))`, `f(info)`, or
any `Hook`.

Goodput (`metatrain.run.goodput`): the loop gives the host's time to the step (dispatch,
and the waits where it fetches), the data, checkpoints, evaluation and compilation, writes
each window's seconds with its metrics (`goodput/*`), counts restarts from
`WORKDIR/goodput.json`, and ends with one line on stderr saying where the time went.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from metatrain.config import OptimizerConfig, RunConfig, config_to_dict
from metatrain.data import global_batch, make_batch_iterator
from metatrain.documents import SkipCounter
from metatrain.errors import FaultError, MetatrainError, Terminated, UserError
from metatrain.evaluation.text_bytes import bits_per_byte, token_byte_lengths
from metatrain.hardware import local_chip
from metatrain.io.storage import as_path
from metatrain.parallel.mesh import sharding_context
from metatrain.roles import LOSS_ROLE_LABELS
from metatrain.run.checkpoint import Checkpointer
from metatrain.run.goodput import Goodput, format_goodput
from metatrain.run.lock import NoLock, workdir_lock
from metatrain.run.metrics import MetricsWriter, add_sums, role_metrics
from metatrain.run.optimizer import cooldown_start, rewarm_warning
from metatrain.run.program import build_train_program
from metatrain.run.resume import check_allowed_changes, check_resume
from metatrain.run.state import init_state
from metatrain.run.workdir import check_origin, check_trainable, prepare_workdir
from metatrain.tokenizer.spm import check_vocab_size
from metatrain.train.hooks import (
    CheckpointHook,
    EvalHook,
    Hook,
    Hooks,
    MetricsWindow,
    PreemptionHook,
    ProfileHook,
    StepInfo,
    StoppedWaitingForData,
)


@dataclasses.dataclass
class TrainSummary:
    """What `train` did: the steps, the last metrics, the throughput and where it all is."""

    workdir: Path
    start_step: int
    final_step: int
    last_metrics: dict[str, Any]
    eval_metrics: dict[str, Any]
    tokens_per_sec: float
    checkpoint_dir: Path
    skipped_records: int
    preempted: bool = False
    goodput: dict[str, Any] = dataclasses.field(default_factory=dict)  # `Goodput.summary()`


class Trainer:
    """Builds everything a run needs from a `RunConfig`; `run()` trains to `trainer.steps`.

    Building a trainer writes nothing: the work directory is locked, the resume
    validated and the run's files written by `run()`.
    """

    def __init__(
        self,
        config: RunConfig,
        workdir: Path,
        hooks: Sequence[Hook] = (),
        devices: Sequence[jax.Device] | None = None,
        *,
        config_file: Path | None = None,
        allow_other_config: bool = False,
        allow_changes: Sequence[str] = (),
    ):
        """Args:
        config: the resolved run config.
        workdir: where checkpoints, metrics and the run's tokenizer go.
        hooks: your hooks, run after the built-in ones (`FunctionHook(every, fn)`, or any `Hook`).
        devices: devices to lay the mesh over (default: every device of every process).
        config_file: the YAML file `config` was read from; a work directory created
            from another file is refused unless `allow_other_config`.
        allow_other_config: continue a work directory created from another config file.
        allow_changes: training-recipe keys (`optimizer.*`, `loss.*`) that may differ
            from the checkpoint's config on resume (`--allow-change`).

        Raises:
            UserError: the work directory is a file, not a run or inside another run's
                checkpoints; the model's vocabulary is not the tokenizer's; the model or
                batch does not fit the mesh; the data cannot give a batch of either split.
        """
        check_trainable(workdir)
        check_vocab_size(config.model.vocab_size, config.data.tokenizer)
        if config.trainer.wandb is not None and jax.process_index() == 0:
            from metatrain.run.wandb_log import preflight

            preflight(config.trainer.wandb)  # before a checkpoint is read or a file written
        self.config = config
        self.workdir = as_path(workdir)
        # The session's clock starts here: building the program and the data streams is
        # part of what a restart costs.
        self.goodput = Goodput(self.workdir, enabled=jax.process_index() == 0)
        self.config_file = config_file
        self.allow_other_config = allow_other_config
        self.allow_changes = check_allowed_changes(allow_changes)
        self.user_hooks: list[Hook] = list(hooks)
        self.is_main = jax.process_index() == 0
        tc = config.trainer

        from metatrain.tokenizer.spm import SpmTokenizer

        # UTF-8 bytes per token, for eval/bpb/text (tags are checked by the encoder later).
        self.token_bytes = token_byte_lengths(SpmTokenizer.load(config.data.tokenizer, _registry(config)))
        # The data order comes from `data.seed`; `trainer.seed` initialises the parameters.
        # One counter for the train and every eval stream: a bad record is counted (and
        # logged) once however often the streams read it, so the summary matches the log.
        self.skips = SkipCounter()
        if tc.eval_every > 0:
            # Checked now, not at the first evaluation: a run whose eval split is empty
            # stops before its first step, with nothing written that a fix must undo.
            make_batch_iterator(config.data, batch_size=tc.batch_size, seq_len=tc.seq_len, split="eval",
                                skips=self.skips).close()
        self.train_iter = make_batch_iterator(config.data, batch_size=tc.batch_size, seq_len=tc.seq_len,
                                              split="train", skips=self.skips)
        try:
            program = build_train_program(config, devices, token_bytes=self.token_bytes)
        except BaseException:
            self.train_iter.close()
            raise
        self.program = program
        self.mesh, self.rules, self.model = program.mesh, program.rules, program.model
        self.optimizer, self.schedule = program.optimizer, program.schedule
        self.shardings, self.batch_sharding = program.shardings, program.batch_sharding
        self.train_step, self.eval_step = program.train_step, program.eval_step
        self.checkpointer = Checkpointer(self.workdir, config.checkpoint)
        self.writer = MetricsWriter(self.workdir, enabled=self.is_main, wandb=tc.wandb,
                                    run_config=config_to_dict(config))
        self.progress = None
        self.lock = None  # the work directory's lock while `run()` holds it
        self._ablation = None  # built at the first evaluation (reads the held-out documents)
        chip = local_chip()
        self.peak_flops = chip.peak_bf16_flops if chip else None
        self.flops_per_token = config.model.flops_per_token(tc.seq_len)

    # -- state ----------------------------------------------------------------
    def initial_state(self, source_params: Any = None):
        """`(state, step)`: the newest intact checkpoint, validated against the config; else
        `checkpoint.branch_from`'s checkpoint whole; else a fresh initialisation at step 0
        (with `checkpoint.init_from`'s parameters: `source_params` when the caller read
        them already, see `run`).

        Raises:
            ResumeRefused: the checkpoint was trained with a config that differs in a key
                that may not change on resume.
            FaultError: there are checkpoints but none restores.
        """

        warnings: dict[int, str | None] = {}

        def validate(step: int, stored: dict) -> None:
            check_resume(stored, config_to_dict(self.config), step=step, workdir=self.workdir, allowed=self.allow_changes)
            warnings[step] = _rewarm_warning(step, stored, self.config)

        restored = self.checkpointer.restore_latest(self.program.abstract_state(), validate)
        if restored is None and self.config.checkpoint.branch_from is not None:
            restored = self._branch_point()
        if restored is None:
            state = init_state(self.model, self.optimizer, self.shardings, self.config.trainer.seed)
            if self.config.checkpoint.init_from is not None:
                state = self._initialised_from(state, source_params)
            return state, 0
        if self.is_main and warnings.get(restored.step):
            print(f"metatrain train: {warnings[restored.step]}", file=sys.stderr, flush=True)
        self.train_iter.set_state(restored.data_state)
        return restored.state, restored.step

    def _branch_point(self):
        """`checkpoint.branch_from`'s whole state (parameters, optimizer moments, step count,
        data position), checked against this config like a resume of that run.

        Raises:
            UserError: not a step directory, or a config that differs in a key a resume
                may not change.
        """
        from metatrain.run.checkpoint import split_step_dir

        path = self.config.checkpoint.branch_from
        found = split_step_dir(path, must_exist=False)
        if found is None:
            raise UserError(f"checkpoint.branch_from {path} is not a checkpoint step directory "
                            "(WORKDIR/checkpoints/<step>); name the step the branch starts from")
        source, step = found
        steps, optimizer = self.config.trainer.steps, self.config.optimizer
        if step >= steps:
            raise UserError(f"checkpoint.branch_from {path}: step {step} is not before this run's trainer.steps="
                            f"{steps}, so the branch would train nothing; branch from an earlier step")
        if optimizer.decay == "wsd" and step > cooldown_start(optimizer, steps):
            raise UserError(f"checkpoint.branch_from {path}: step {step} is past this run's cooldown start "
                            f"({cooldown_start(optimizer, steps)} of trainer.steps={steps}), so it would not be "
                            "the separate run of its length; branch from that step")

        def validate(at: int, stored: dict) -> None:
            check_resume(stored, config_to_dict(self.config), step=at, workdir=source, allowed=self.allow_changes)
            theirs = stored.get("optimizer", {})
            if theirs.get("decay") == "wsd":
                start = cooldown_start(OptimizerConfig(**theirs), int(stored["trainer"]["steps"]))
                if at > start:
                    raise UserError(f"checkpoint.branch_from {path}: its run was already cooling down at step {at} "
                                    f"(from step {start}); branch from a step of its stable phase")

        restored = Checkpointer(source, read_only=True).restore_step(step, self.program.abstract_state(), validate)
        print(f"metatrain train: branching from {path} (step {step}: parameters, optimizer and data position)",
              file=sys.stderr, flush=True)
        return restored

    def source_checkpoint(self) -> Any:
        """`checkpoint.init_from`'s checkpoint, restored onto this run's mesh (read outside
        the sharding context: its restore places arrays on the concrete mesh).

        Raises:
            UserError: no checkpoint there.
        """
        from metatrain.run.layout import CONFIG_FILE
        from metatrain.run.reader import load_checkpoint

        path = as_path(self.config.checkpoint.init_from)
        where = {"workdir": path} if (path / CONFIG_FILE).exists() else {"checkpoint": path}
        return load_checkpoint(**where, mesh=self.mesh, rules=self.rules)

    def _initialised_from(self, state, loaded: Any = None) -> Any:
        """`state` with the parameters of another run's checkpoint (`checkpoint.init_from`),
        placed as this run's parameters are; the optimizer's moments start at zero.

        Raises:
            UserError: no checkpoint there, or a model of another shape.
        """
        loaded = loaded if loaded is not None else self.source_checkpoint()
        path = as_path(self.config.checkpoint.init_from)
        ours = jax.tree.map(lambda a: tuple(a.shape), state.params)
        theirs = jax.tree.map(lambda a: tuple(a.shape), loaded.params)
        if jax.tree.structure(ours) != jax.tree.structure(theirs) or jax.tree.leaves(ours) != jax.tree.leaves(theirs):
            def shape(c) -> str:
                return f"d_model {c.d_model}, {c.n_layers} layers, d_ff {c.d_ff}, vocabulary {c.vocab_size}"

            raise UserError(f"checkpoint.init_from {path}: its model ({shape(loaded.model_config)}) has other "
                            f"parameters than this run's ({shape(self.config.model)}); start from a run of the same "
                            "shape, or remove checkpoint.init_from")
        params = jax.tree.map(lambda new, old: new.astype(old.dtype),
                              jax.device_put(loaded.params, self.shardings.params), state.params)
        print(f"metatrain train: parameters from {loaded.path} (step {loaded.step}); the optimizer starts afresh",
              file=sys.stderr, flush=True)
        return state.replace(params=params)

    def next_batch(self) -> dict[str, jax.Array]:
        return global_batch(next(self.train_iter), self.batch_sharding)

    # -- evaluation -----------------------------------------------------------
    def evaluate(self, params) -> dict[str, Any]:
        """Per-role losses on the first `eval_batches` batches of the held-out split.

        `eval/loss` is the training loss's definition (`metatrain.loss.joint_loss`, z-loss
        included), weighted over the batches by their loss weight. `eval/bpb/text` is bits
        per UTF-8 byte of text (`metatrain.evaluation.text_bytes`), and with
        `trainer.eval_ablation` the `eval/ablation/*` keys say how much the thinking helps
        predict the text after it (`metatrain.evaluation.in_loop`).
        """
        tc = self.config.trainer
        sums = None
        with make_batch_iterator(self.config.data, batch_size=tc.batch_size, seq_len=tc.seq_len, split="eval",
                                 skips=self.skips) as it:
            for _ in range(tc.eval_batches):
                try:
                    local = next(it)
                except StopIteration:
                    break
                sums = add_sums(sums, self.eval_step(params, global_batch(local, self.batch_sharding)))
        metrics: dict[str, Any] = {}
        if sums is not None:
            loss = sums["loss_weighted_sum"] / sums["weight_sum"] if sums["weight_sum"] > 0 else None
            metrics = {"eval/loss": loss, **role_metrics(sums, prefix="eval/")}
            metrics["eval/bpb/text"] = bits_per_byte(sums["nll_sum/text"], sums.get("bytes/text", 0.0))
        # On every process, even one whose own eval stream was empty: its batches are collective.
        if tc.eval_ablation:
            metrics.update(self._in_loop_ablation().evaluate(self.eval_step, params, self.batch_sharding))
        return metrics

    def _in_loop_ablation(self):
        if self._ablation is None:
            from metatrain.data.sources import EncoderSpec
            from metatrain.evaluation.in_loop import InLoopAblation

            d = self.config.data
            encoder = EncoderSpec(str(d.tokenizer), str(d.tags), d.mantra, d.mantra_policy).build()
            self._ablation = InLoopAblation(self.config, encoder, self.skips)
        return self._ablation

    # -- the loop ---------------------------------------------------------------
    def steps(self, state, start: int, preemption: PreemptionHook | None = None) -> Iterator[StepInfo]:
        """Train from `state` at step `start`, yielding every step until `trainer.steps`
        (or the step a preemption stops at)."""
        total = self.config.trainer.steps
        step = start
        while step < total:
            try:
                with (self.goodput.timing("data"),
                      preemption.waiting_for_data() if preemption is not None else contextlib.nullcontext()):
                    batch = self.next_batch()
            except StoppedWaitingForData:
                kept = self.checkpointer.latest_step()
                print(f"metatrain train: SIGTERM while waiting for a batch after step {step} (the data stream had "
                      f"skipped {self.skips.count} bad records so far, more may wait to be counted); stopping: "
                      "no checkpoint was saved, "
                      + (f"the last one (step {kept}) is kept" if kept is not None else "there is none yet"),
                      file=sys.stderr, flush=True)
                raise
            with self.goodput.timing("step"):  # the dispatch; the device is waited for at the fetch
                state, metrics = self.train_step(state, batch)
            step += 1
            self.goodput.step_done(step)
            preempted = preemption is not None and preemption.reached(step) and step < total
            yield StepInfo(step, state, metrics, final=step == total or preempted, preempted=preempted)
            if preempted:
                return

    def run(self) -> TrainSummary:
        """Lock the work directory, resume (validated) or start, and train to `trainer.steps`.

        Steps are traced inside the mesh's sharding context, so the model's logical
        activation constraints take effect.
        """
        with _lock(self.workdir) as held, self.goodput.listening():
            self.lock = held.inner
            if self.is_main:
                check_origin(self.workdir, self.config_file, self.allow_other_config)
            source = None
            if self.config.checkpoint.init_from is not None and self.checkpointer.latest_step() is None:
                source = self.source_checkpoint()
            with sharding_context(self.mesh, self.rules):
                state, start = self.initial_state(source)
                if self.is_main:
                    prepare_workdir(self.config, self.workdir, self.config_file)
                self.writer.open()
                restarted = self.goodput.begin(start)
                if restarted is not None and self.is_main:
                    print(f"metatrain train: {restarted}", file=sys.stderr, flush=True)
                return self._run(state, start)

    def _run(self, state, start: int) -> TrainSummary:
        tc = self.config.trainer
        show = self.is_main and tc.progress
        terminal = sys.stderr.isatty()
        self.progress = _progress_bar(start, tc.steps) if show and terminal else None
        window = MetricsWindow(writer=self.writer, checkpointer=self.checkpointer, skips=self.skips,
                               log_every=tc.log_every, tokens_per_step=self.config.tokens_per_step,
                               flops_per_token=self.flops_per_token, peak_flops=self.peak_flops,
                               progress=self.progress, progress_lines=sys.stderr if show and not terminal else None,
                               total_steps=tc.steps, goodput=self.goodput)
        checkpoint = CheckpointHook(window=window, checkpointer=self.checkpointer, writer=self.writer,
                                    data=self.train_iter, config_dict=config_to_dict(self.config),
                                    every=self.config.checkpoint.every, workdir=self.workdir, lock=self.lock,
                                    also_at=self.config.checkpoint.keep_steps, goodput=self.goodput)
        evaluation = EvalHook(evaluate=self.evaluate, writer=self.writer, every=tc.eval_every, goodput=self.goodput)
        profile = ProfileHook(self.workdir, *tc.profile, first_step=start) if tc.profile else None
        with PreemptionHook(self.checkpointer, checkpoint) as preemption:
            self.hooks = Hooks([window, preemption, checkpoint, evaluation, *self.user_hooks])
            if profile is not None:
                self.hooks.add(profile)
            info = None
            try:
                for info in self.steps(state, start, preemption):
                    if self.progress is not None:
                        self.progress.update(1)
                    self.hooks.run(info)
                    state = info.state
            except BaseException as error:
                self.goodput.stopped(info.step if info is not None else start,  # for the restart's count
                                     preempted=isinstance(error, Terminated))
                if isinstance(error, FaultError):
                    # A write that fails while an asynchronous save runs is most often that save
                    # filling the disk: its fault names the cause and the checkpoint that is kept.
                    self.checkpointer.wait()
                raise
            finally:
                self.hooks.close()  # ends a profile the loop stopped inside
        if self.progress is not None:
            self.progress.close()
        final_step = info.step if info is not None else start
        with self.goodput.timing("checkpoint"):
            try:
                self.checkpointer.wait()
            except BaseException:
                self.goodput.stopped(final_step)
                raise
        self.state = state
        preempted = info is not None and info.preempted
        # The time after the last window (final evaluation, checkpoint, the wait for its save).
        tail = self.goodput.window(final_step, stepped=False)
        if info is not None:  # a session that trained no step (already at trainer.steps) adds no row
            self.writer.write(final_step, tail)
        self.goodput.end(final_step, preempted=preempted)
        goodput = self.goodput.summary()
        if self.is_main:
            print(f"metatrain train: {format_goodput(goodput)}", file=sys.stderr, flush=True)
        return TrainSummary(
            workdir=self.workdir,
            start_step=start,
            final_step=final_step,
            last_metrics=window.last,
            eval_metrics=evaluation.last,
            tokens_per_sec=window.tokens_per_sec(),
            checkpoint_dir=self.checkpointer.directory,
            skipped_records=self.skips.count,
            preempted=preempted,
            goodput=goodput,
        )

    def close(self, failed: bool = False) -> None:
        """Wait for the last save and release files (a W&B run is marked failed when
        `failed`); a failure here does not hide an earlier one."""
        try:
            self.checkpointer.close()
        finally:
            self.writer.close(failed=failed)
            self.train_iter.close()


def _rewarm_warning(step: int, stored: dict, config: RunConfig) -> str | None:
    """`rewarm_warning` for a resume from a checkpoint whose saved config is `stored`."""
    try:
        before = OptimizerConfig(**stored.get("optimizer", {}))
        before_steps = int(stored["trainer"]["steps"])
    except (TypeError, KeyError, ValueError, UserError):
        return None  # a config check_resume accepted but that names no schedule: nothing to compare
    return rewarm_warning(step, before, before_steps, config.optimizer, config.trainer.steps)


def _registry(config: RunConfig):
    from metatrain.tokenizer.registry import load_registry

    return load_registry(config.data.tags)


class _lock:
    """The work directory's lock for this run: process 0 takes it; every process learns
    whether it got it (so that no process trains on a directory another trainer holds)."""

    def __init__(self, workdir: Path):
        self._inner = workdir_lock(workdir) if jax.process_index() == 0 else NoLock()

    @property
    def inner(self):
        """The lock this process holds (`NoLock` on processes other than 0)."""
        return self._inner

    def __enter__(self):
        error: MetatrainError | None = None
        try:
            self._inner.__enter__()
        except MetatrainError as e:
            error = e
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
            if not ok and error is None:
                raise UserError("process 0 could not take the work directory's lock (its log says why)")
        if error is not None:
            raise error
        return self

    def __exit__(self, *exc) -> None:
        self._inner.__exit__(*exc)


def _progress_bar(start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def train(
    config: RunConfig,
    workdir: Path,
    hooks: Sequence[Hook] = (),
    devices: Sequence[jax.Device] | None = None,
    *,
    config_file: Path | None = None,
    allow_other_config: bool = False,
    allow_changes: Sequence[str] = (),
) -> TrainSummary:
    """Train (or resume) the run described by `config` in `workdir` (see `Trainer`)."""
    trainer = Trainer(
        config, workdir, hooks, devices,
        config_file=config_file, allow_other_config=allow_other_config, allow_changes=allow_changes,
    )
    try:
        summary = trainer.run()
    except BaseException:
        try:
            trainer.close(failed=True)
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass
        raise
    trainer.close()
    return summary


def format_summary(summary: TrainSummary) -> str:
    """A short human summary printed at the end of `metatrain train`."""
    m = summary.last_metrics
    lines = [f"trained steps {summary.start_step} -> {summary.final_step} in {summary.workdir}"]
    if summary.preempted:
        lines.append(
            f"preempted (SIGTERM): checkpoint saved at step {summary.final_step}; "
            "run the same command again to resume"
        )
    if m:
        roles = "  ".join(
            f"{r} {m[f'loss/{r}']:.3f}" for r in LOSS_ROLE_LABELS if m.get(f"loss/{r}") is not None
        )
        lines.append(f"final loss {m['loss']:.4f}  per role: {roles}")
    e = summary.eval_metrics
    if e and e.get("eval/loss") is not None:
        roles = "  ".join(
            f"{r} {e[f'eval/loss/{r}']:.3f}" for r in LOSS_ROLE_LABELS if e.get(f"eval/loss/{r}") is not None
        )
        lines.append(f"eval loss {e['eval/loss']:.4f}  per role: {roles}")
    lines.append(f"throughput {summary.tokens_per_sec:,.0f} tokens/s")
    if summary.goodput:
        lines.append(format_goodput(summary.goodput))
    if summary.skipped_records:
        lines.append(f"skipped {summary.skipped_records} invalid records (see log)")
    lines.append(f"checkpoints: {summary.checkpoint_dir}")
    return "\n".join(lines)


def summary_json(summary: TrainSummary) -> str:
    d = dataclasses.asdict(summary)
    d["workdir"] = str(summary.workdir)
    d["checkpoint_dir"] = str(summary.checkpoint_dir)
    return json.dumps(d)
