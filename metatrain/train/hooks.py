"""What runs after each training step: the `Hook` protocol and the trainer's own hooks.

    Hook            the protocol: `every`, `at_end`, `__call__(info)`, `close()`
    HookBase        no-op defaults of the optional parts (not at the end, nothing to close)
    FunctionHook    `fn(info)` every `every` steps: the way to add your own
    Hooks           the hooks of one run, in the order they run after each step
    StepInfo        one optimizer update, as hooks see it

The trainer's hooks, each with its own cadence:

- `MetricsWindow` (every step): keeps the device metrics of the current window and
  fetches them once per `trainer.log_every` steps (the host never waits on the device
  in between), checks that the loss is finite (`check_finite`: a NaN stops the run
  naming the step), writes `metrics.jsonl` and TensorBoard with the window's goodput
  (`metatrain.run.goodput`), and shows the window on the progress bar or, when stderr
  is not a terminal, as one line there.
- `PreemptionHook` (every step): after a SIGTERM, saves at the step every process
  agreed on and stops the loop; `metatrain train` then exits 75 and the same command
  resumes. A SIGTERM while the loop waits for a batch that does not come within
  `DATA_WAIT_GRACE_S` stops the run there, without a new checkpoint (143). With one process a signal handler notices the signal; with several, JAX's
  preemption service (started by `jax.distributed.initialize`) picks the step.
- `CheckpointHook` (every `checkpoint.every` steps and at the end): flushes the metrics
  window first, so a non-finite loss is caught before its state could be saved.
- `EvalHook` (every `trainer.eval_every` steps and at the end): the held-out split's
  metrics (`Trainer.evaluate`), written with the training metrics.
- `ProfileHook` (every step, with `trainer.profile`): a `jax.profiler` trace of a range
  of steps; `close()` ends a trace the run stopped inside.

Each hook is given what it reads and writes (the checkpointer, the metrics writer, the
run's `Goodput` clock, which the fetch, the save and the evaluation report their time to)
and knows nothing of the `Trainer` (`metatrain.train.loop`), which builds them, runs
them after each step and closes them when the loop ends, however it ends.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence, TextIO, TypeVar

import jax
import numpy as np

from metatrain.data import BatchIterator
from metatrain.documents import SkipCounter
from metatrain.errors import DivergedError, FaultError, Terminated, raised_here_is_lost
from metatrain.io.storage import as_path
from metatrain.run.checkpoint import Checkpointer
from metatrain.run.goodput import Goodput
from metatrain.run.layout import TENSORBOARD_DIR
from metatrain.run.metrics import MetricsWriter, add_sums, mfu, role_metrics


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


class Hook(Protocol):
    """What the trainer runs after each step.

    A hook is called after every `every`-th step (never on a cadence when `every` is 0),
    and after the last step of the run too when `at_end`; `close()` is called once when
    the loop ends, also when it ends with an error. Subclass `HookBase` for the defaults
    of `at_end` and `close`, or use `FunctionHook`.
    """

    @property
    def every(self) -> int:
        """Steps between calls (0: none on a cadence)."""
        ...

    @property
    def at_end(self) -> bool:
        """Also called after the last step of the run."""
        ...

    def __call__(self, info: StepInfo) -> None:
        """Act on the step `info`."""
        ...

    def close(self) -> None:
        """Release what the hook holds; the loop has ended (maybe with an error)."""
        ...


class HookBase(abc.ABC):
    """A hook's optional parts, defaulted: not called at the end, nothing to close."""

    at_end: bool = False

    @abc.abstractmethod
    def __call__(self, info: StepInfo) -> None:
        """Act on the step `info`."""

    def close(self) -> None:
        """Nothing to release."""


@dataclasses.dataclass(frozen=True)
class FunctionHook(HookBase):
    """`fn(info)` after every `every`-th step, and after the last step too if `at_end`."""

    every: int
    fn: Callable[[StepInfo], None]
    at_end: bool = False

    def __call__(self, info: StepInfo) -> None:
        self.fn(info)


_H = TypeVar("_H", bound=Hook)


class Hooks:
    """Hooks in the order they run after each step."""

    def __init__(self, hooks: Sequence[Hook] = ()):
        self._hooks: list[Hook] = list(hooks)

    def add(self, hook: _H) -> _H:
        """Run `hook` after the others; returns it."""
        self._hooks.append(hook)
        return hook

    def run(self, info: StepInfo) -> None:
        """Call each hook whose cadence (or `at_end`, on the last step) falls on `info`."""
        for hook in self._hooks:
            if (hook.every and info.step % hook.every == 0 or (info.final and hook.at_end)
                    or info.step in getattr(hook, "also_at", ())):
                hook(info)

    def close(self) -> None:
        """Close every hook, in order; the first error is raised once all are closed."""
        error: BaseException | None = None
        for hook in self._hooks:
            try:
                hook.close()
            except BaseException as e:  # noqa: BLE001 - the others are closed first
                error = error or e
        if error is not None:
            raise error


def _timed(goodput: Goodput | None, category: str) -> contextlib.AbstractContextManager:
    """`goodput.timing(category)`, or nothing where the hook has no clock."""
    return goodput.timing(category) if goodput is not None else contextlib.nullcontext()


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


class MetricsWindow(HookBase):
    """Device metrics of the steps since the last flush; fetched and written once a window.

    Args:
        writer: where the metrics go (`metrics.jsonl`, TensorBoard).
        checkpointer: the run's checkpoints, named when the loss is not finite.
        skips: the run's count of skipped records, reported with the metrics.
        log_every: steps per window (`trainer.log_every`).
        tokens_per_step: tokens one step consumes, for the throughput.
        flops_per_token: model FLOPs per token, for the MFU.
        peak_flops: the chip's peak FLOP/s (None: unknown, no MFU).
        progress: a tqdm bar to show the loss on, or None.
        progress_lines: where to print one progress line per window (stderr when it is
            not a terminal, so a log under nohup or a scheduler shows the run moving), or None.
        total_steps: the run's `trainer.steps`, named in the progress lines.
        goodput: the run's time accounting: the fetch counts as step time, and each window
            closes its goodput window (`goodput/*` keys), or None.
    """

    every = 1
    at_end = True

    def __init__(self, *, writer: MetricsWriter, checkpointer: Checkpointer, skips: SkipCounter, log_every: int,
                 tokens_per_step: int, flops_per_token: int, peak_flops: float | None, progress: Any = None,
                 progress_lines: TextIO | None = None, total_steps: int = 0, goodput: Goodput | None = None):
        self.writer, self.checkpointer, self.skips = writer, checkpointer, skips
        self.goodput = goodput
        self.log_every = log_every
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.progress = progress
        self.progress_lines, self.total_steps = progress_lines, total_steps
        self.pending: list[tuple[int, dict]] = []
        self.last: dict[str, Any] = {}
        self.throughput: list[float] = []
        self._window_start = time.perf_counter()
        self._tokens_per_step = tokens_per_step

    def __call__(self, info: StepInfo) -> None:
        self.pending.append((info.step, info.metrics))
        if info.step % self.log_every == 0 or info.final:
            self.flush()

    def flush(self) -> None:
        """Fetch, check and write the window's metrics (nothing when it is empty)."""
        if not self.pending:
            return
        # Where the host waits for the device: the window's steps finish here.
        with _timed(self.goodput, "step"):
            host = [(s, jax.device_get(m)) for s, m in self.pending]
        elapsed = time.perf_counter() - self._window_start
        check_finite(host, self.checkpointer)
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
            "mfu": mfu(self.flops_per_token, tps, self.peak_flops, jax.device_count()),
            "skipped_records": self.skips.count,
        }
        if self.goodput is not None:
            metrics.update(self.goodput.window(host[-1][0]))
        self.writer.write(host[-1][0], metrics)
        self.last = metrics
        self.pending.clear()
        self._window_start = time.perf_counter()
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tps:,.0f}")
        if self.progress_lines is not None:
            skipped = f"  skipped {self.skips.count} bad records" if self.skips.count else ""
            print(f"metatrain train: step {host[-1][0]}/{self.total_steps}  loss {metrics['loss']:.4f}  "
                  f"{tps:,.0f} tokens/s{skipped}", file=self.progress_lines, flush=True)

    def tokens_per_sec(self) -> float:
        """The median throughput of the windows (the first left out when there are others)."""
        steady = self.throughput[1:] or self.throughput
        return float(np.median(steady)) if steady else 0.0


class CheckpointHook(HookBase):
    """Saves (state, data state, config) every `every` steps, at the `also_at` steps and at the end.

    Args:
        window: the metrics window, flushed before each save.
        checkpointer: where the checkpoints go.
        writer: the metrics writer, flushed before each save.
        data: the training batch stream, whose state is saved.
        config_dict: the run's config, saved with the state (`config_to_dict`).
        every: steps between saves (`checkpoint.every`).
        also_at: steps saved off that cadence (`checkpoint.keep_steps`).
        workdir: the work directory, for the messages.
        lock: the work directory's lock; once it is `lost`, nothing more is saved.
        goodput: the run's time accounting (the save call counts as checkpoint time, and
            each save is recorded for the next restart), or None.
    """

    at_end = True

    def __init__(self, *, window: MetricsWindow, checkpointer: Checkpointer, writer: MetricsWriter,
                 data: BatchIterator, config_dict: dict[str, Any], every: int, workdir: Path, lock: Any,
                 also_at: Sequence[int] = (), goodput: Goodput | None = None):
        self.window, self.checkpointer, self.writer, self.data = window, checkpointer, writer, data
        self.goodput = goodput
        self.config_dict = config_dict
        self.every = every
        self.also_at = frozenset(also_at)
        self.workdir, self.lock = workdir, lock
        self.last_saved: int | None = None

    def __call__(self, info: StepInfo) -> None:
        self.save(info)

    def save(self, info: StepInfo) -> None:
        """Save the step `info` (once; a second call for the same step does nothing).

        Raises:
            DivergedError: the window's loss is not finite (nothing is saved).
            FaultError: another trainer took over the work directory's lock.
        """
        if self.last_saved == info.step:
            return
        self.window.flush()  # a non-finite loss stops the run before its state is saved
        if getattr(self.lock, "lost", False):  # `NoLock` and the local lock cannot be lost
            raise FaultError(
                f"another trainer took over the lock of {self.workdir} (this run's heartbeat was "
                f"late); stopping without saving step {info.step}, so two runs never write one directory"
            )
        self.writer.flush()  # every step up to this checkpoint is in metrics.jsonl
        with _timed(self.goodput, "checkpoint"):  # waits for the previous async save too
            self.checkpointer.save(info.step, info.state, self.data.get_state(), self.config_dict)
        if self.goodput is not None:
            self.goodput.checkpoint_saved(info.step)
        self.last_saved = info.step


class EvalHook(HookBase):
    """Held-out metrics every `every` steps and at the end (never when `every` is 0).

    Args:
        evaluate: `evaluate(params) -> metrics` (`Trainer.evaluate`).
        writer: where the metrics go.
        every: steps between evaluations (`trainer.eval_every`; 0: never).
        goodput: the run's time accounting (the wait for the steps before the evaluation
            counts as step time, the evaluation as eval time), or None.
    """

    def __init__(self, *, evaluate: Callable[[Any], dict[str, Any]], writer: MetricsWriter, every: int,
                 goodput: Goodput | None = None):
        self.evaluate, self.writer = evaluate, writer
        self.goodput = goodput
        self.every = every
        self.at_end = bool(self.every)
        self.last: dict[str, Any] = {}

    def __call__(self, info: StepInfo) -> None:
        if info.preempted:
            return
        with _timed(self.goodput, "step"):  # the steps dispatched before it finish first
            jax.block_until_ready(info.metrics)
        with _timed(self.goodput, "eval"):
            metrics = self.evaluate(info.state.params)
        if metrics:
            self.writer.write(info.step, metrics)
            self.last = metrics


#: Seconds a SIGTERM that arrives while the loop waits for a batch gives that batch
#: before the run stops without a checkpoint (a stream skipping a long run of bad records
#: may not make one for minutes).
DATA_WAIT_GRACE_S: float = 5.0


class StoppedWaitingForData(Terminated):
    """SIGTERM while the loop waited for a batch that did not come within the grace."""


class PreemptionHook(HookBase):
    """After a SIGTERM: save at the step every process agrees on, then stop the loop.

    The loop asks `reached(step)` before it yields each step, so that the step carries
    `preempted`; this hook then saves through the checkpoint hook. Used as a context
    manager, which installs (and restores) the SIGTERM handler of a single process.

    A SIGTERM that arrives while the loop waits for a batch (`waiting_for_data`) gives
    that batch `DATA_WAIT_GRACE_S` seconds: a batch that comes is trained on and saved
    as above; otherwise `StoppedWaitingForData` is raised where the wait is, and the
    run stops without a new checkpoint (the stream's position inside a batch cannot be
    saved), keeping the last one.
    """

    every = 1
    at_end = False

    def __init__(self, checkpointer: Checkpointer, checkpoint_hook: CheckpointHook):
        self._checkpointer = checkpointer
        self._checkpoint_hook = checkpoint_hook
        self._signalled = False
        self._waiting = False
        self._previous = None
        self._previous_alarm = None
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
        if self._previous_alarm is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous_alarm)
            self._previous_alarm = None

    def _on_sigterm(self, signum, frame) -> None:
        self._signalled = True
        if self._waiting:
            self._start_grace()

    def _start_grace(self) -> None:
        if self._previous_alarm is None:
            self._previous_alarm = signal.signal(signal.SIGALRM, self._on_grace_over)
        signal.setitimer(signal.ITIMER_REAL, DATA_WAIT_GRACE_S)

    def _on_grace_over(self, signum, frame) -> None:
        if not self._waiting:
            return
        if raised_here_is_lost(frame):  # inside a garbage-collector callback: try again shortly
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            return
        raise StoppedWaitingForData()

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        """The loop waits for its next batch inside this (see the class docstring)."""
        if self._previous is None:  # no handler of ours (several processes, another thread)
            yield
            return
        self._waiting = True
        if self._signalled:  # SIGTERM came during the last step's hooks: the grace starts now
            self._start_grace()
        try:
            yield
        finally:
            self._waiting = False
            if self._previous_alarm is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (asked after every step, on every process)."""
        if self._collective:
            return self._checkpointer.reached_preemption(step)
        return self._signalled

    def __call__(self, info: StepInfo) -> None:
        if info.preempted:
            self._checkpoint_hook.save(info)


class ProfileHook(HookBase):
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
        """End the trace if one is running (the traced range ended, or the loop did)."""
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()
            if jax.process_index() == 0:
                print(f"metatrain: profile of steps {self.start}-{self.last} in {self.directory}", file=sys.stderr)
