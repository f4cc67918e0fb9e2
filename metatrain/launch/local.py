"""`metatrain launch local`: P processes on this machine, joined by `jax.distributed`.

The command is `train` (each process makes its share of every batch), or `eval` or
`annotate`: one model sharded over a mesh of every process's devices, every process
stepping the same batches, process 0 writing the outputs.

Each process runs `python -m metatrain.cli <command...>` with CPU devices
(`--xla_force_host_platform_device_count=D`), the coordinator on the loopback and its
id in the environment (see `metatrain.launch.distributed`); collectives go over gloo.
The launcher streams every process's output line by line with a `[process N]` prefix
and supervises them:

- all exit 0: exit 0;
- all exit 0 or `EXIT_PREEMPTED` (75, after a SIGTERM and a collective save),
  at least one 75: exit 75 (run the same command again to resume);
- one dies (non-zero exit or a signal) while others run: the others are stopped
  (SIGTERM, then SIGKILL after a grace period), the failing process and its last lines
  are reported, and the launcher exits with its status (128 + N for signal N).

SIGTERM or Ctrl-C to the launcher is forwarded (as SIGTERM) to every process, which
then finish their step, save a checkpoint together and exit 75 (`train`), or stop and
exit 143 leaving nothing half-written (`eval`, `annotate`; the launcher exits 143 too);
a second one kills them.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Mapping, Sequence, TextIO

from metatrain.errors import (
    EXIT_PREEMPTED,
    EXIT_TERMINATED,
    UserError,
    exit_description,
)
from metatrain.launch import distributed as dist
from metatrain.launch.validate import check_port

if TYPE_CHECKING:
    from metatrain.launch.plan import TrainParser

_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """One process to start: its index, command line and full environment."""

    index: int
    argv: tuple[str, ...]
    env: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class Failure:
    """The process that ended the run: its index, pid, exit status and last output lines."""

    index: int
    pid: int
    returncode: int
    last_lines: tuple[str, ...]

    @property
    def how(self) -> str:
        return exit_description(self.returncode)


@dataclasses.dataclass(frozen=True)
class LaunchResult:
    """How a supervised run ended.

    Attributes:
        exit_code: what the launcher exits with.
        returncodes: every process's status (negative: killed by that signal).
        failure: the process that failed first, if one did.
        stopped: indices of processes the launcher had to stop.
    """

    exit_code: int
    returncodes: tuple[int, ...]
    failure: Failure | None = None
    stopped: tuple[int, ...] = ()


def cpu_device_flags(xla_flags: str, devices: int) -> str:
    """`xla_flags` with the host device count set to `devices` (any previous count removed)."""
    kept = _DEVICE_COUNT_FLAG.sub("", xla_flags).split()
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def local_process_specs(
    command: Sequence[str],
    *,
    processes: int,
    devices_per_process: int,
    port: int,
    base_env: Mapping[str, str] | None = None,
    python: str = sys.executable,
) -> list[ProcessSpec]:
    """The processes of a local run of `metatrain <command...>`.

    Args:
        command: the metatrain command and its arguments, e.g. `["train", "--config", "x.yaml"]`.
        processes: how many processes (P).
        devices_per_process: CPU devices each process has (D).
        port: the coordinator's port on the loopback (process 0 listens on it), 1..65535.
        base_env: environment to start from (default: this process's).
        python: the interpreter to run.
    """
    if processes < 1:
        raise UserError(f"--processes {processes}: need at least 1 process")
    if devices_per_process < 1:
        raise UserError(f"--devices-per-process {devices_per_process}: need at least 1 device per process")
    check_port("--port", port)
    base = dict(os.environ if base_env is None else base_env)
    for name in (dist.ENV_MODE, dist.ENV_COORDINATOR, dist.ENV_NUM_PROCESSES, dist.ENV_PROCESS_ID, dist.ENV_LOCAL_DEVICE_IDS):
        base.pop(name, None)
    base.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=cpu_device_flags(base.get("XLA_FLAGS", ""), devices_per_process),
        PYTHONUNBUFFERED="1",
    )
    specs = []
    for index in range(processes):
        env = dict(base)
        if processes > 1:
            env.update(
                {
                    dist.ENV_COORDINATOR: f"127.0.0.1:{port}",
                    dist.ENV_NUM_PROCESSES: str(processes),
                    dist.ENV_PROCESS_ID: str(index),
                }
            )
        specs.append(ProcessSpec(index, (python, "-m", "metatrain.cli", *command), env))
    return specs


class _Running:
    """One started process: the Popen, a thread copying its output, its last lines."""

    def __init__(self, spec: ProcessSpec, out: TextIO, lock: threading.Lock, tail_lines: int):
        self.spec = spec
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.popen = subprocess.Popen(
            list(spec.argv),
            env=dict(spec.env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole, spared terminal ^C
        )
        self._thread = threading.Thread(target=self._copy, args=(out, lock), daemon=True)
        self._thread.start()

    def _copy(self, out: TextIO, lock: threading.Lock) -> None:
        prefix = f"[process {self.spec.index}] "
        assert self.popen.stdout is not None
        for raw in iter(self.popen.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self.tail.append(line)
            with lock:
                out.write(prefix + line + "\n")
                out.flush()

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def signal(self, signum: int, group: bool = False) -> None:
        """Send `signum` to the process (or its whole process group); ignore if gone."""
        try:
            if group:
                os.killpg(self.popen.pid, signum)
            else:
                self.popen.send_signal(signum)
        except (ProcessLookupError, PermissionError):
            pass

    def finish_output(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)


@dataclasses.dataclass
class _Watch:
    """What the supervisor has seen so far."""

    forwarded_at: float | None = None  # when a SIGTERM was forwarded to the processes
    first_exit_at: float | None = None  # when the first process ended (cleanly)
    handled_signals: int = 0  # signals to the launcher acted on
    ended_at: dict[int, float] = dataclasses.field(default_factory=dict)  # process index -> first seen ended

    @property
    def expected_codes(self) -> tuple[int, ...]:
        """Exit statuses that are not failures (dying of, or exiting 143 on, a forwarded
        SIGTERM is not)."""
        if self.forwarded_at is None:
            return (0, EXIT_PREEMPTED)
        return (0, EXIT_PREEMPTED, -signal.SIGTERM, EXIT_TERMINATED)

    def note_exits(self, running: Sequence["_Running"], codes: Sequence[int | None], now: float) -> None:
        for p, c in zip(running, codes):
            if c is not None:
                self.ended_at.setdefault(p.spec.index, now)
                if self.first_exit_at is None:
                    self.first_exit_at = now

    def cause(self, failed: Sequence["_Running"]) -> "_Running":
        """The first to end is the cause; among those seen in one check, one killed by a
        signal (e.g. SIGKILL) rather than one that ended on losing its peer: by exiting,
        or by SIGABRT (the collectives' C++ runtime aborts when a peer's data stops)."""

        def how(p: "_Running") -> int:
            code = p.popen.returncode
            return 2 if code >= 0 else 1 if code == -signal.SIGABRT else 0

        return min(failed, key=lambda p: (self.ended_at[p.spec.index], how(p), p.spec.index))


class Supervisor:
    """Starts processes, streams their output and decides how the run ended.

    Args:
        out: where prefixed output goes (default: standard output).
        kill_grace_s: after stopping a process with SIGTERM, seconds until SIGKILL.
        exit_grace_s: after one process ends cleanly (0 or 75), seconds the others have
            to end too before they are stopped as hung.
        preempt_timeout_s: after forwarding a SIGTERM, seconds the processes have to
            save and exit before they are killed.
        tail_lines: output lines kept per process for the failure report.
        poll_s: seconds between checks.
    """

    def __init__(
        self,
        out: TextIO | None = None,
        *,
        kill_grace_s: float = 3.0,
        exit_grace_s: float = 120.0,
        preempt_timeout_s: float = 600.0,
        tail_lines: int = 20,
        poll_s: float = 0.1,
    ):
        self.out = sys.stdout if out is None else out
        self.kill_grace_s = kill_grace_s
        self.exit_grace_s = exit_grace_s
        self.preempt_timeout_s = preempt_timeout_s
        self.tail_lines = tail_lines
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._signals: list[int] = []

    def say(self, message: str) -> None:
        with self._lock:
            self.out.write(f"[launch] {message}\n")
            self.out.flush()

    # -- signals to the launcher ------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._signals.append(signum)

    def _install_handlers(self) -> dict[int, object]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    # -- the run ---------------------------------------------------------------------------
    def run(self, specs: Sequence[ProcessSpec]) -> LaunchResult:
        """Start every process in `specs`, supervise them to the end, report how it went."""
        previous = self._install_handlers()
        running: list[_Running] = []
        try:
            for spec in specs:
                running.append(_Running(spec, self.out, self._lock, self.tail_lines))
                self.say(f"process {spec.index}: pid {running[-1].popen.pid}")
            return self._supervise(running)
        finally:
            for proc in running:
                if proc.returncode is None:
                    proc.signal(signal.SIGKILL, group=True)
                    proc.popen.wait()
                proc.finish_output()
                if proc.popen.stdout is not None:
                    proc.popen.stdout.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _supervise(self, running: list[_Running]) -> LaunchResult:
        """Check every `poll_s` until the run is over; return how it ended."""
        watch = _Watch()
        while True:
            now = time.monotonic()
            codes = [p.returncode for p in running]
            watch.note_exits(running, codes, now)
            failed = [p for p, c in zip(running, codes) if c is not None and c not in watch.expected_codes]
            if failed:
                return self._fail(running, watch.cause(failed))
            if all(c is not None for c in codes):
                return self._finished(running, codes)
            stop = self._react_to_signals(running, watch, now) or self._check_deadlines(running, codes, watch, now)
            if stop is not None:
                return stop
            time.sleep(self.poll_s)

    def _react_to_signals(self, running: list[_Running], watch: "_Watch", now: float) -> LaunchResult | None:
        """Forward the first SIGTERM/SIGINT to the launcher; kill everything on the second."""
        if len(self._signals) <= watch.handled_signals:
            return None
        watch.handled_signals = len(self._signals)
        if watch.forwarded_at is not None:
            self.say("second signal: killing every process")
            return self._stop_all(running, reason="killed on a second signal")
        watch.forwarded_at = now
        self.say("SIGTERM to every process: finish the step, save a checkpoint, exit 75")
        for p in running:
            p.signal(signal.SIGTERM)
        return None

    def _check_deadlines(
        self, running: list[_Running], codes: list[int | None], watch: "_Watch", now: float
    ) -> LaunchResult | None:
        """Stop processes that outlive a forwarded SIGTERM, or a peer's clean exit, too long."""
        if watch.forwarded_at is not None and now - watch.forwarded_at > self.preempt_timeout_s:
            return self._stop_all(running, reason=f"not done {self.preempt_timeout_s:.0f} s after SIGTERM")
        if watch.first_exit_at is not None and now - watch.first_exit_at > self.exit_grace_s:
            hung = [p.spec.index for p, c in zip(running, codes) if c is None]
            return self._stop_all(
                running, reason=f"processes {hung} still running {self.exit_grace_s:.0f} s after another finished"
            )
        return None

    def _finished(self, running: list[_Running], codes: list[int | None]) -> LaunchResult:
        codes_t = tuple(int(c) for c in codes if c is not None)
        exit_code = EXIT_PREEMPTED if EXIT_PREEMPTED in codes_t else 0
        for p in running:
            p.finish_output()
        if -signal.SIGTERM in codes_t:  # a forwarded SIGTERM reached a process before it could save
            ended = [p.spec.index for p, c in zip(running, codes_t) if c == -signal.SIGTERM]
            self.say(f"processes {ended} ended on SIGTERM before saving a checkpoint (still starting?)")
            return LaunchResult(128 + signal.SIGTERM, codes_t)
        if EXIT_TERMINATED in codes_t:  # only after a forwarded SIGTERM (else a failure)
            ended = [p.spec.index for p, c in zip(running, codes_t) if c == EXIT_TERMINATED]
            self.say(f"processes {ended} stopped on SIGTERM without a checkpoint (eval, annotate, or a "
                     f"train still starting); nothing half-written is left (exit {EXIT_TERMINATED})")
            return LaunchResult(EXIT_TERMINATED, codes_t)
        if exit_code == EXIT_PREEMPTED:
            self.say(f"preempted: a checkpoint was saved; run the same command again to resume (exit {exit_code})")
        else:
            self.say(f"all {len(running)} processes finished")
        return LaunchResult(exit_code, codes_t)

    def _stop(self, procs: Sequence[_Running]) -> None:
        """SIGTERM, then SIGKILL to the process groups still alive after the grace period."""
        for p in procs:
            p.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace_s
        while time.monotonic() < deadline and any(p.returncode is None for p in procs):
            time.sleep(self.poll_s)
        for p in procs:
            p.signal(signal.SIGKILL, group=True)
            p.popen.wait()

    def _fail(self, running: list[_Running], failed: _Running) -> LaunchResult:
        alive = [p for p in running if p is not failed and p.returncode is None]
        self._stop(alive)
        for p in running:
            p.finish_output()
        failure = Failure(failed.spec.index, failed.popen.pid, int(failed.popen.returncode), tuple(failed.tail))
        stopped = tuple(p.spec.index for p in alive)
        ended = {p.spec.index: int(p.popen.returncode) for p in running if p is not failed and p not in alive}
        self.say(self.failure_report(failure, stopped, ended))
        code = failure.returncode if failure.returncode > 0 else 128 - failure.returncode
        return LaunchResult(code, tuple(int(p.popen.returncode) for p in running), failure, stopped)

    def _stop_all(self, running: list[_Running], reason: str) -> LaunchResult:
        alive = [p for p in running if p.returncode is None]
        self._stop(alive)
        for p in running:
            p.finish_output()
        self.say(f"stopped processes {[p.spec.index for p in alive]}: {reason}")
        return LaunchResult(1, tuple(int(p.popen.returncode) for p in running), None, tuple(p.spec.index for p in alive))

    @staticmethod
    def failure_report(failure: Failure, stopped: Sequence[int], ended: Mapping[int, int]) -> str:
        """What failed and how, its last output lines, and what became of the others.

        Args:
            failure: the process that failed first.
            stopped: indices of the processes the launcher stopped.
            ended: index -> exit status of the others that had ended by themselves.
        """
        lines = [f"process {failure.index} (pid {failure.pid}) {failure.how}"]
        if stopped:
            lines.append(f"stopped the other processes: {', '.join(map(str, stopped))}")
        for index, code in sorted(ended.items()):
            how = Failure(index, 0, code, ()).how
            lines.append(f"process {index} had already ended ({how})")
        if failure.last_lines:
            lines.append(f"last lines of process {failure.index}:")
            lines.extend(f"  | {line}" for line in failure.last_lines)
        else:
            lines.append(f"process {failure.index} printed nothing")
        return "\n".join(lines)


def pick_port() -> int:
    """A free TCP port on this machine for the coordinator."""
    import portpicker

    return portpicker.pick_unused_port()


def run_local(
    command: Sequence[str],
    *,
    processes: int,
    devices_per_process: int = 1,
    port: int | None = None,
    out: TextIO | None = None,
    dry_run: bool = False,
) -> int:
    """Run `metatrain <command...>` as `processes` local processes; returns the exit code."""
    out = sys.stdout if out is None else out
    specs = local_process_specs(
        command, processes=processes, devices_per_process=devices_per_process,
        port=pick_port() if port is None else port,
    )
    if dry_run:
        out.write(format_specs(specs) + "\n")
        return 0
    return Supervisor(out).run(specs).exit_code


def launch_local(
    command: Sequence[str],
    *,
    parse: TrainParser,
    processes: int,
    devices_per_process: int = 1,
    port: int | None = None,
    dry_run: bool = False,
) -> int:
    """`metatrain launch local`: the command checked here, then `run_local`.

    `train` has its config loaded and its mesh and batch checked against the processes;
    `eval` and `annotate` (`plan.INFERENCE_COMMANDS`: one model sharded over a mesh of
    every process's devices, the same batches on every process) have their words and
    arguments checked, and each process checks its mesh as it loads the checkpoint.

    Args:
        command: the words after the launcher's options (`-- train [train args]`,
            `-- eval [eval args]`, `-- annotate [annotate args]`).
        parse: parses the command's words as metatrain's command line does (`plan.TrainParser`).
        processes, devices_per_process, port, dry_run: as `run_local`.

    Returns:
        The launcher's exit status (see the module docstring).

    Raises:
        UserError: the command cannot start (refused before P processes start).
    """
    from metatrain.launch.plan import (
        INFERENCE_COMMANDS,
        check_run_shape,
        launched_words,
        parse_inference_command,
        parse_train_command,
    )

    words = launched_words(command, ("train", *INFERENCE_COMMANDS))
    if words[0] == "train":
        train = parse_train_command(words, parse=parse)  # refuse a run that cannot start before starting P processes
        if processes >= 1 and devices_per_process >= 1:
            check_run_shape(train.config, processes * devices_per_process, processes)
    else:
        parse_inference_command(words, parse=parse)
    return run_local(words, processes=processes, devices_per_process=devices_per_process, port=port, dry_run=dry_run)


def format_specs(specs: Sequence[ProcessSpec]) -> str:
    """The processes as shell lines (only the variables the launcher sets)."""
    import shlex

    names = ("JAX_PLATFORMS", "XLA_FLAGS", dist.ENV_COORDINATOR, dist.ENV_NUM_PROCESSES, dist.ENV_PROCESS_ID)
    lines = []
    for spec in specs:
        env = " ".join(f"{n}={shlex.quote(spec.env[n])}" for n in names if n in spec.env)
        lines.append(f"{env} {shlex.join(spec.argv)} &")
    lines.append("wait")
    return "\n".join(lines)
