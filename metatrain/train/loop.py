"""The training loop: data in, one jitted donating step, metrics/eval/checkpoints around it.

The loop owns the effects (files, clocks, logging, signals); the step is pure. Device
metrics are fetched once per logging window, so the host never waits on the device
between logs, except at checkpoint steps, where the window is flushed first so that a
non-finite loss is caught before its state could be saved.

Preemption: on SIGTERM the loop finishes the step in flight, saves a checkpoint at the
step reached and returns with `TrainSummary.preempted` set; `metatrain train` then exits
with `PREEMPTED_EXIT_CODE` (75), and running the same command again resumes. With one
process a Python signal handler notices the signal; with several, JAX's preemption
service (started by `jax.distributed.initialize`) catches it on any process and picks a
step every process stops at (`reached_preemption_sync_point`), so the save is collective.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from metatrain.config import RunConfig, config_to_dict, save_config
from metatrain.data import global_batch, make_batch_iterator
from metatrain.errors import UserError
from metatrain.hardware import local_chip
from metatrain.parallel.mesh import sharding_context
from metatrain.roles import LOSS_ROLE_LABELS
from metatrain.train.checkpoint import Checkpointer
from metatrain.train.metrics import MetricsWriter, add_sums, mfu, role_metrics
from metatrain.train.program import build_train_program
from metatrain.train.state import init_state


#: Exit status of `metatrain train` when it stopped on SIGTERM after saving a checkpoint
#: (EX_TEMPFAIL: run the same command again to resume).
PREEMPTED_EXIT_CODE: int = 75


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(step, state, metrics)` called after every `every`-th step (metrics may be None)."""

    every: int
    fn: Callable[[int, Any, dict | None], None]


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


def weighted_loss(sums: dict[str, float], weights: dict[str, float]) -> float | None:
    """Σ_r w_r·nll_r / Σ_r w_r·count_r from per-role sums (the joint loss without z-loss)."""
    num = sum(weights[r] * sums[f"nll_sum/{r}"] for r in LOSS_ROLE_LABELS)
    den = sum(weights[r] * sums[f"count/{r}"] for r in LOSS_ROLE_LABELS)
    return num / den if den > 0 else None


def prepare_workdir(config: RunConfig, workdir: Path) -> None:
    """Make the work directory self-contained: resolved config, tokenizer and tag registry."""
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(config, workdir / "config.yaml")
    for src, name in ((config.data.tokenizer, "tokenizer.model"), (config.data.tags, "tags.yaml")):
        src_path = Path(src)
        if not src_path.is_file():
            raise UserError(f"data: file {src} does not exist (needed by the run, copied into {workdir})")
        dst = workdir / name
        if not dst.exists() or dst.read_bytes() != src_path.read_bytes():
            shutil.copyfile(src_path, dst)


class _PreemptionWatch:
    """Notices SIGTERM and says at which step every process should stop and save."""

    def __init__(self, checkpointer: Checkpointer):
        self._checkpointer = checkpointer
        self._signalled = False
        self._previous = None
        # With several processes JAX's preemption service owns SIGTERM (a Python handler
        # would replace it and the processes could stop at different steps).
        self._collective = jax.process_count() > 1

    def __enter__(self) -> "_PreemptionWatch":
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
        """Whether to save and stop after `step` (call after every step, on every process)."""
        if self._collective:
            return self._checkpointer.reached_preemption(step)
        return self._signalled


class Trainer:
    """Builds everything a run needs from a `RunConfig`; `run()` trains to `trainer.steps`."""

    def __init__(
        self,
        config: RunConfig,
        workdir: Path,
        hooks: tuple[Hook, ...] = (),
        devices: Sequence[jax.Device] | None = None,
    ):
        """Args:
        config: the resolved run config.
        workdir: where checkpoints, metrics and the run's tokenizer go.
        hooks: called after every `hook.every`-th step.
        devices: devices to lay the mesh over (default: every device of every process).
        """
        self.config = config
        self.workdir = Path(workdir)
        self.hooks = list(hooks)
        self.is_main = jax.process_index() == 0
        tc = config.trainer

        program = build_train_program(config, devices)
        self.program = program
        self.mesh, self.rules, self.model = program.mesh, program.rules, program.model
        self.optimizer, self.schedule = program.optimizer, program.schedule
        self.shardings, self.batch_sharding = program.shardings, program.batch_sharding
        self.train_step, self.eval_step = program.train_step, program.eval_step
        self.train_iter = make_batch_iterator(
            config.data, batch_size=tc.batch_size, seq_len=tc.seq_len, split="train", seed=tc.seed
        )
        self.role_weights = {
            r: float(getattr(config.loss.weights, r)) for r in LOSS_ROLE_LABELS
        }
        self.checkpointer = Checkpointer(self.workdir, config.checkpoint)
        self.writer = MetricsWriter(self.workdir, enabled=self.is_main)
        chip = local_chip()
        self.peak_flops = chip.peak_bf16_flops if chip else None
        self.flops_per_token = config.model.flops_per_token(tc.seq_len)

    # -- state ----------------------------------------------------------------
    def initial_state(self):
        """Restore the latest checkpoint in the work directory, or initialise fresh."""
        latest = self.checkpointer.latest_step()
        if latest is None:
            return init_state(self.model, self.optimizer, self.shardings, self.config.trainer.seed), 0
        state, data_state, _ = self.checkpointer.restore(latest, self.program.abstract_state())
        self.train_iter.set_state(data_state)
        return state, latest

    def next_batch(self) -> dict[str, jax.Array]:
        return global_batch(next(self.train_iter), self.batch_sharding)

    # -- evaluation -----------------------------------------------------------
    def evaluate(self, params) -> dict[str, Any]:
        """Per-role losses on the first `eval_batches` batches of the held-out split."""
        tc = self.config.trainer
        sums = None
        with make_batch_iterator(
            self.config.data, batch_size=tc.batch_size, seq_len=tc.seq_len, split="eval", seed=tc.seed
        ) as it:
            for _ in range(tc.eval_batches):
                try:
                    local = next(it)
                except StopIteration:
                    break
                sums = add_sums(sums, self.eval_step(params, global_batch(local, self.batch_sharding)))
        if sums is None:
            return {}
        out = {"eval/loss": weighted_loss(sums, self.role_weights)}
        out.update(role_metrics(sums, prefix="eval/"))
        return out

    # -- the loop ---------------------------------------------------------------
    def run(self) -> TrainSummary:
        """Train from the latest checkpoint (or from scratch) to `trainer.steps`.

        Steps are traced inside the mesh's sharding context, so the model's logical
        activation constraints take effect.
        """
        with sharding_context(self.mesh, self.rules), _PreemptionWatch(self.checkpointer) as watch:
            return self._run(watch)

    def _run(self, watch: _PreemptionWatch) -> TrainSummary:
        tc = self.config.trainer
        prepare_workdir(self.config, self.workdir)
        state, start = self.initial_state()
        config_dict = config_to_dict(self.config)
        tokens_per_step = tc.batch_size * tc.seq_len
        progress = _progress_bar(start, tc.steps, enabled=self.is_main and tc.progress)

        pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet fetched
        window_start = time.perf_counter()
        last: dict[str, Any] = {}
        eval_metrics: dict[str, Any] = {}
        throughput: list[float] = []

        def flush(step: int) -> None:
            nonlocal window_start, last
            if not pending:
                return
            host = [(s, jax.device_get(m)) for s, m in pending]
            elapsed = time.perf_counter() - window_start
            for s, m in host:
                if not np.isfinite(m["loss"]):
                    raise NonFiniteLossError(
                        f"loss is {float(m['loss'])} at step {s}; stopping. The last good checkpoint "
                        f"is kept in {self.checkpointer.directory} (step {self.checkpointer.latest_step()}); "
                        "lower optimizer.learning_rate or raise optimizer.warmup_steps and resume."
                    )
            sums = None
            for _, m in host:
                sums = add_sums(sums, {k: v for k, v in m.items() if "/" in k or k == "weight_sum"})
            n = len(host)
            tps = n * tokens_per_step / elapsed if elapsed > 0 else 0.0
            throughput.append(tps)
            last_m = host[-1][1]
            metrics: dict[str, Any] = {
                "loss": float(np.mean([m["loss"] for _, m in host])),
                **role_metrics(sums),
                "learning_rate": float(last_m["learning_rate"]),
                "grad_norm": float(last_m["grad_norm"]),
                "tokens_per_sec": tps,
                "step_time": elapsed / n,
                "mfu": mfu(self.flops_per_token, tps, self.peak_flops, jax.device_count()),
                "skipped_records": self.train_iter.skips.count,
            }
            self.writer.write(step, metrics)
            last = metrics
            pending.clear()
            window_start = time.perf_counter()
            if progress is not None:
                progress.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tps:,.0f}")

        step = start
        preempted = False
        while step < tc.steps and not preempted:
            batch = self.next_batch()
            state, metrics = self.train_step(state, batch)
            step += 1
            pending.append((step, metrics))
            if progress is not None:
                progress.update(1)
            preempted = watch.reached(step) and step < tc.steps
            save_now = step % self.config.checkpoint.every == 0 or step == tc.steps or preempted
            if step % tc.log_every == 0 or save_now:
                flush(step)
            if save_now:
                self.checkpointer.save(step, state, self.train_iter.get_state(), config_dict)
            if preempted:
                break
            if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
                eval_metrics = self.evaluate(state.params)
                if eval_metrics:
                    self.writer.write(step, eval_metrics)
            for hook in self.hooks:
                if step % hook.every == 0:
                    hook.fn(step, state, last)
        flush(step)
        if progress is not None:
            progress.close()
        self.checkpointer.wait()
        self.state = state
        steady = throughput[1:] or throughput
        return TrainSummary(
            workdir=self.workdir,
            start_step=start,
            final_step=step,
            last_metrics=last,
            eval_metrics=eval_metrics,
            tokens_per_sec=float(np.median(steady)) if steady else 0.0,
            checkpoint_dir=self.checkpointer.directory,
            skipped_records=self.train_iter.skips.count,
            preempted=preempted,
        )

    def close(self) -> None:
        self.checkpointer.close()
        self.writer.close()
        self.train_iter.close()


def _progress_bar(start: int, total: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def train(
    config: RunConfig,
    workdir: Path,
    hooks: tuple[Hook, ...] = (),
    devices: Sequence[jax.Device] | None = None,
) -> TrainSummary:
    """Train (or resume) the run described by `config` in `workdir`."""
    trainer = Trainer(config, workdir, hooks, devices)
    try:
        return trainer.run()
    finally:
        trainer.close()


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
