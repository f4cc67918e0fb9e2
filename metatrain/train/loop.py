"""The training loop: one jitted donating step that yields each step to its hooks.

    trainer = Trainer(config, workdir)
    for info in trainer.steps(state, start):   # one StepInfo per optimizer update
        trainer.hooks.run(info)                # metrics window, preemption, checkpoint, eval, yours

`Trainer.run()` is that loop, inside the work directory's lock, after a validated
restore. Everything with an effect is a hook with its own cadence:

- `MetricsWindow` (every step): keeps the device metrics of the current window and
  fetches them once per `trainer.log_every` steps (the host never waits on the device
  in between), checks that the loss is finite (`check_finite`: a NaN stops the run
  naming the step), and writes `metrics.jsonl` and TensorBoard.
- `PreemptionHook` (every step): after a SIGTERM, saves at the step every process
  agreed on and stops the loop; `metatrain train` then exits 75 and the same command
  resumes. With one process a signal handler notices the signal; with several, JAX's
  preemption service (started by `jax.distributed.initialize`) picks the step.
- `CheckpointHook` (every `checkpoint.every` steps and at the end): flushes the metrics
  window first, so a non-finite loss is caught before its state could be saved.
- `EvalHook` (every `trainer.eval_every` steps and at the end): the held-out split's
  loss, the same loss definition as training (z-loss included), bits per byte of text
  (`eval/bpb/text`) and, with `trainer.eval_ablation`, how much the thinking helps
  predict the text after it (`eval/ablation/removed_minus_kept`, `metatrain.evaluation`).

Your own hooks: `Trainer(..., hooks=(Hook(every=N, fn=f),))`, `f(info)`.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from metatrain.config import RunConfig, config_to_dict
from metatrain.data import global_batch, make_batch_iterator
from metatrain.documents import SkipCounter
from metatrain.errors import DivergedError, FaultError, MetatrainError, UserError
from metatrain.evaluation.text_bytes import bits_per_byte, token_byte_lengths
from metatrain.hardware import local_chip
from metatrain.io.storage import as_path
from metatrain.parallel.mesh import sharding_context
from metatrain.roles import LOSS_ROLE_LABELS
from metatrain.run.checkpoint import Checkpointer
from metatrain.run.layout import TENSORBOARD_DIR
from metatrain.run.metrics import MetricsWriter, add_sums, mfu, role_metrics
from metatrain.run.program import build_train_program
from metatrain.run.resume import check_allowed_changes, check_resume
from metatrain.run.state import init_state
from metatrain.run.workdir import NoLock, check_origin, prepare_workdir, workdir_lock
from metatrain.tokenizer.spm import check_vocab_size


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """One optimizer update, as hooks see it.

    Attributes:
        step: updates applied so far (1 after the first step).
        state: the train state after this step.
        metrics: this step's device metric sums (not fetched).
        final: the last step of this invocation (`trainer.steps` reached, or preempted).
        preempted: the run stops here after a SIGTERM.
    """

    step: int
    state: Any
    metrics: dict[str, jax.Array]
    final: bool
    preempted: bool = False


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(info)` after every `every`-th step, and after the last step too if `at_end`."""

    every: int
    fn: Callable[[StepInfo], None]
    at_end: bool = False

    def __call__(self, info: StepInfo) -> None:
        self.fn(info)


class Hooks:
    """Hooks in the order they run after each step."""

    def __init__(self, hooks: Sequence[Any] = ()):
        self._hooks: list[Any] = list(hooks)

    def add(self, hook: Any) -> Any:
        self._hooks.append(hook)
        return hook

    def run(self, info: StepInfo) -> None:
        for hook in self._hooks:
            if hook.every and info.step % hook.every == 0 or (info.final and getattr(hook, "at_end", False)):
                hook(info)


@dataclasses.dataclass
class TrainSummary:
    workdir: Path
    start_step: int
    final_step: int
    last_metrics: dict[str, Any]
    eval_metrics: dict[str, Any]
    tokens_per_sec: float
    checkpoint_dir: Path
    skipped_records: int
    preempted: bool = False


def check_finite(records: Sequence[tuple[int, dict]], checkpointer: Checkpointer) -> None:
    """Stop at the first non-finite loss of a fetched window, naming it and the checkpoint kept.

    Raises:
        DivergedError: a loss is NaN or infinite.
    """
    for step, m in records:
        if not np.isfinite(m["loss"]):
            raise DivergedError(
                f"loss is {float(m['loss'])} at step {step}; stopping. The last good checkpoint "
                f"is kept in {checkpointer.directory} (step {checkpointer.latest_step()}); "
                "to resume from it with a lower learning rate: --set optimizer.learning_rate=LR "
                "--allow-change optimizer.learning_rate"
            )


class MetricsWindow:
    """Device metrics of the steps since the last flush; fetched and written once a window."""

    every = 1
    at_end = True

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        self.log_every = trainer.config.trainer.log_every
        self.pending: list[tuple[int, dict]] = []
        self.last: dict[str, Any] = {}
        self.throughput: list[float] = []
        self._window_start = time.perf_counter()
        self._tokens_per_step = trainer.config.tokens_per_step

    def __call__(self, info: StepInfo) -> None:
        self.pending.append((info.step, info.metrics))
        if info.step % self.log_every == 0 or info.final:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        host = [(s, jax.device_get(m)) for s, m in self.pending]
        elapsed = time.perf_counter() - self._window_start
        check_finite(host, self.trainer.checkpointer)
        sums = None
        for _, m in host:
            sums = add_sums(sums, {k: v for k, v in m.items() if "/" in k or k == "weight_sum"})
        n = len(host)
        tps = n * self._tokens_per_step / elapsed if elapsed > 0 else 0.0
        self.throughput.append(tps)
        last_m = host[-1][1]
        metrics: dict[str, Any] = {
            "loss": float(np.mean([m["loss"] for _, m in host])),
            **role_metrics(sums),
            "learning_rate": float(last_m["learning_rate"]),
            "grad_norm": float(last_m["grad_norm"]),
            "tokens_per_sec": tps,
            "step_time": elapsed / n,
            "mfu": mfu(self.trainer.flops_per_token, tps, self.trainer.peak_flops, jax.device_count()),
            "skipped_records": self.trainer.skips.count,
        }
        self.trainer.writer.write(host[-1][0], metrics)
        self.last = metrics
        self.pending.clear()
        self._window_start = time.perf_counter()
        if self.trainer.progress is not None:
            self.trainer.progress.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tps:,.0f}")

    def tokens_per_sec(self) -> float:
        steady = self.throughput[1:] or self.throughput
        return float(np.median(steady)) if steady else 0.0


class CheckpointHook:
    """Saves (state, data state, config) every `checkpoint.every` steps and at the end."""

    at_end = True

    def __init__(self, trainer: "Trainer", window: MetricsWindow):
        self.trainer = trainer
        self.window = window
        self.every = trainer.config.checkpoint.every
        self.config_dict = config_to_dict(trainer.config)
        self.last_saved: int | None = None

    def __call__(self, info: StepInfo) -> None:
        self.save(info)

    def save(self, info: StepInfo) -> None:
        if self.last_saved == info.step:
            return
        self.window.flush()  # a non-finite loss stops the run before its state is saved
        if getattr(self.trainer.lock, "lost", False):
            raise FaultError(
                f"another trainer took over the lock of {self.trainer.workdir} (this run's heartbeat was "
                f"late); stopping without saving step {info.step}, so two runs never write one directory"
            )
        self.trainer.writer.flush()  # every step up to this checkpoint is in metrics.jsonl
        self.trainer.checkpointer.save(info.step, info.state, self.trainer.train_iter.get_state(), self.config_dict)
        self.last_saved = info.step


class EvalHook:
    """Per-role losses on the held-out split every `trainer.eval_every` steps and at the end."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        self.every = trainer.config.trainer.eval_every
        self.at_end = bool(self.every)
        self.last: dict[str, Any] = {}

    def __call__(self, info: StepInfo) -> None:
        if info.preempted:
            return
        metrics = self.trainer.evaluate(info.state.params)
        if metrics:
            self.trainer.writer.write(info.step, metrics)
            self.last = metrics


class PreemptionHook:
    """After a SIGTERM: save at the step every process agrees on, then stop the loop.

    The loop asks `reached(step)` before it yields each step, so that the step carries
    `preempted`; this hook then saves through the checkpoint hook.
    """

    every = 1
    at_end = False

    def __init__(self, checkpointer: Checkpointer, checkpoint_hook: CheckpointHook):
        self._checkpointer = checkpointer
        self._checkpoint_hook = checkpoint_hook
        self._signalled = False
        self._previous = None
        # With several processes JAX's preemption service owns SIGTERM (a Python handler
        # would replace it and the processes could stop at different steps).
        self._collective = jax.process_count() > 1

    def __enter__(self) -> "PreemptionHook":
        if not self._collective and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        self._signalled = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (asked after every step, on every process)."""
        if self._collective:
            return self._checkpointer.reached_preemption(step)
        return self._signalled

    def __call__(self, info: StepInfo) -> None:
        if info.preempted:
            self._checkpoint_hook.save(info)


class ProfileHook:
    """A `jax.profiler` trace of steps `start .. start+steps-1` (`trainer.profile`), written
    under `WORKDIR/tensorboard` where TensorBoard's profile plugin (or xprof) finds it."""

    every = 1
    at_end = True

    def __init__(self, workdir: Path, start: int, steps: int, first_step: int):
        self.directory = as_path(workdir) / TENSORBOARD_DIR
        self.start, self.last = start, start + steps - 1
        self.tracing = False
        if first_step + 1 >= start and first_step < self.last:  # the traced range begins now
            self._begin()

    def _begin(self) -> None:
        jax.profiler.start_trace(str(self.directory))
        self.tracing = True

    def __call__(self, info: StepInfo) -> None:
        if not self.tracing and info.step == self.start - 1 and not info.final:
            self._begin()
        elif self.tracing and (info.step >= self.last or info.final):
            jax.block_until_ready(info.metrics)  # the traced steps' device work, finished
            self.close()

    def close(self) -> None:
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()
            if jax.process_index() == 0:
                print(f"metatrain: profile of steps {self.start}-{self.last} in {self.directory}", file=sys.stderr)


class Trainer:
    """Builds everything a run needs from a `RunConfig`; `run()` trains to `trainer.steps`.

    Building a trainer writes nothing: the work directory is locked, the resume
    validated and the run's files written by `run()`.
    """

    def __init__(
        self,
        config: RunConfig,
        workdir: Path,
        hooks: Sequence[Any] = (),
        devices: Sequence[jax.Device] | None = None,
        *,
        config_file: Path | None = None,
        allow_other_config: bool = False,
        allow_changes: Sequence[str] = (),
    ):
        """Args:
        config: the resolved run config.
        workdir: where checkpoints, metrics and the run's tokenizer go.
        hooks: your hooks, run after the built-in ones (`Hook(every, fn)`).
        devices: devices to lay the mesh over (default: every device of every process).
        config_file: the YAML file `config` was read from; a work directory created
            from another file is refused unless `allow_other_config`.
        allow_other_config: continue a work directory created from another config file.
        allow_changes: training-recipe keys (`optimizer.*`, `loss.*`) that may differ
            from the checkpoint's config on resume (`--allow-change`).

        Raises:
            UserError: the model's vocabulary is not the tokenizer's, or the model or
                batch does not fit the mesh.
        """
        check_vocab_size(config.model.vocab_size, config.data.tokenizer)
        self.config = config
        self.workdir = as_path(workdir)
        self.config_file = config_file
        self.allow_other_config = allow_other_config
        self.allow_changes = check_allowed_changes(allow_changes)
        self.user_hooks = list(hooks)
        self.is_main = jax.process_index() == 0
        tc = config.trainer

        from metatrain.tokenizer.spm import SpmTokenizer

        # UTF-8 bytes per token, for eval/bpb/text (tags are checked by the encoder later).
        self.token_bytes = token_byte_lengths(SpmTokenizer.load(config.data.tokenizer, _registry(config)))
        program = build_train_program(config, devices, token_bytes=self.token_bytes)
        self.program = program
        self.mesh, self.rules, self.model = program.mesh, program.rules, program.model
        self.optimizer, self.schedule = program.optimizer, program.schedule
        self.shardings, self.batch_sharding = program.shardings, program.batch_sharding
        self.train_step, self.eval_step = program.train_step, program.eval_step
        # The data order comes from `data.seed`; `trainer.seed` initialises the parameters.
        # One counter for the train and every eval stream: a bad record is counted (and
        # logged) once however often the streams read it, so the summary matches the log.
        self.skips = SkipCounter()
        self.train_iter = make_batch_iterator(config.data, batch_size=tc.batch_size, seq_len=tc.seq_len,
                                              split="train", skips=self.skips)
        self.checkpointer = Checkpointer(self.workdir, config.checkpoint)
        self.writer = MetricsWriter(self.workdir, enabled=self.is_main)
        self.progress = None
        self.lock = None  # the work directory's lock while `run()` holds it
        self._ablation = None  # built at the first evaluation (reads the held-out documents)
        chip = local_chip()
        self.peak_flops = chip.peak_bf16_flops if chip else None
        self.flops_per_token = config.model.flops_per_token(tc.seq_len)

    # -- state ----------------------------------------------------------------
    def initial_state(self):
        """`(state, step)`: the newest intact checkpoint, validated against the config, or a
        fresh initialisation at step 0.

        Raises:
            ResumeRefused: the checkpoint was trained with a config that differs in a key
                that may not change on resume.
            FaultError: there are checkpoints but none restores.
        """

        def validate(step: int, stored: dict) -> None:
            check_resume(stored, config_to_dict(self.config), step=step, workdir=self.workdir, allowed=self.allow_changes)

        restored = self.checkpointer.restore_latest(self.program.abstract_state(), validate)
        if restored is None:
            return init_state(self.model, self.optimizer, self.shardings, self.config.trainer.seed), 0
        self.train_iter.set_state(restored.data_state)
        return restored.state, restored.step

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
            state, metrics = self.train_step(state, self.next_batch())
            step += 1
            preempted = preemption is not None and preemption.reached(step) and step < total
            yield StepInfo(step, state, metrics, final=step == total or preempted, preempted=preempted)
            if preempted:
                return

    def run(self) -> TrainSummary:
        """Lock the work directory, resume (validated) or start, and train to `trainer.steps`.

        Steps are traced inside the mesh's sharding context, so the model's logical
        activation constraints take effect.
        """
        with _lock(self.workdir) as held:
            self.lock = held.inner
            if self.is_main:
                check_origin(self.workdir, self.config_file, self.allow_other_config)
            with sharding_context(self.mesh, self.rules):
                state, start = self.initial_state()
                if self.is_main:
                    prepare_workdir(self.config, self.workdir, self.config_file)
                self.writer.open()
                return self._run(state, start)

    def _run(self, state, start: int) -> TrainSummary:
        tc = self.config.trainer
        self.progress = _progress_bar(start, tc.steps, enabled=self.is_main and tc.progress)
        window = MetricsWindow(self)
        checkpoint = CheckpointHook(self, window)
        evaluation = EvalHook(self)
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
            finally:
                if profile is not None:
                    profile.close()
        if self.progress is not None:
            self.progress.close()
        self.checkpointer.wait()
        self.state = state
        return TrainSummary(
            workdir=self.workdir,
            start_step=start,
            final_step=info.step if info is not None else start,
            last_metrics=window.last,
            eval_metrics=evaluation.last,
            tokens_per_sec=window.tokens_per_sec(),
            checkpoint_dir=self.checkpointer.directory,
            skipped_records=self.skips.count,
            preempted=info is not None and info.preempted,
        )

    def close(self) -> None:
        """Wait for the last save and release files; a failure here does not hide an earlier one."""
        try:
            self.checkpointer.close()
        finally:
            self.writer.close()
            self.train_iter.close()


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


def _progress_bar(start: int, total: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def train(
    config: RunConfig,
    workdir: Path,
    hooks: Sequence[Any] = (),
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
            trainer.close()
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
    if summary.skipped_records:
        lines.append(f"skipped {summary.skipped_records} invalid records (see log)")
    lines.append(f"checkpoints: {summary.checkpoint_dir}")
    return "\n".join(lines)


def summary_json(summary: TrainSummary) -> str:
    d = dataclasses.asdict(summary)
    d["workdir"] = str(summary.workdir)
    d["checkpoint_dir"] = str(summary.checkpoint_dir)
    return json.dumps(d)
