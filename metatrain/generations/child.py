"""One stage as a child process: `python -m metatrain.cli <command...>`, supervised.

Each stage runs as its own `metatrain` command so that its own resume applies (annotate
continues after its last written document, train from its newest checkpoint), the
accelerator's memory is freed between stages, and a failure is the child's exit status
and its own one-line message (the last line it printed to stderr).

- The child's stdout and stderr are copied, line by line, to this process's stderr with
  a `[gen-<n>/<stage>]` prefix and to the stage's log file.
- The child dies with this process: on Linux it asks the kernel for SIGKILL when its
  parent dies (`prctl(PR_SET_PDEATHSIG)`), so a `kill -9` of the loop leaves no stage
  running; it runs in its own session, so a terminal's Ctrl-C reaches only the loop,
  which forwards it.
- SIGTERM or Ctrl-C to the loop (raised as `Terminated` / `KeyboardInterrupt` by the
  CLI's handlers while it waits) is forwarded to the child as SIGTERM / SIGINT; the
  child stops the way it does under a preemption (train saves a checkpoint) and the
  exception goes on once it has ended. A second signal, or a child still running
  `STOP_GRACE_SECONDS` later, gets SIGKILL.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from metatrain.errors import Terminated, exit_description

#: Seconds a child may take to stop after a forwarded signal before it is killed.
STOP_GRACE_SECONDS: float = 120.0
#: Lines of the child's stderr kept for the failure message.
TAIL_LINES: int = 40
_PR_SET_PDEATHSIG = 1


@dataclasses.dataclass(frozen=True)
class ChildResult:
    """How a child ended: its exit status (negative: killed by that signal) and its last stderr lines."""

    returncode: int
    stderr_tail: tuple[str, ...]

    @property
    def how(self) -> str:
        how = exit_description(self.returncode)
        return f"was {how}" if self.returncode < 0 else how

    @property
    def message(self) -> str:
        """The child's own error line (`metatrain CMD: error: ...`), else its last stderr line."""
        lines = [line.strip() for line in self.stderr_tail if line.strip()]
        for line in reversed(lines):
            if line.startswith("metatrain ") and (": error: " in line or ": fault: " in line):
                return line
        return lines[-1] if lines else "(no message)"


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A `preexec_fn`: SIGKILL this child when the process that started it dies (Linux)."""

    def setup() -> None:
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            except (OSError, AttributeError):
                pass
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return setup


class Child:
    """A started stage: `wait()` supervises it to its end."""

    def __init__(self, argv: Sequence[str], *, label: str, log: Path, env: Mapping[str, str] | None = None):
        self.label = label
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "a", encoding="utf-8")  # noqa: SIM115 - closed by wait()
        self._log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
        self._log.flush()
        self._lock = threading.Lock()
        self.popen = subprocess.Popen(
            list(argv), env=dict(os.environ if env is None else env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),  # noqa: PLW1509 - no thread holds a lock the child needs
        )
        self._threads = [threading.Thread(target=self._copy, args=(stream, keep), daemon=True)
                         for stream, keep in ((self.popen.stdout, False), (self.popen.stderr, True))]
        for thread in self._threads:
            thread.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _copy(self, stream, keep: bool) -> None:
        prefix = f"[{self.label}] "
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if keep:
                self.tail.append(line)
            with self._lock:
                self._log.write(line + "\n")
                self._log.flush()
                try:
                    sys.stderr.write(prefix + line + "\n")
                    sys.stderr.flush()
                except (OSError, ValueError):  # a closed terminal: the log keeps it
                    pass

    def signal(self, signum: int) -> None:
        """Send `signum` to the child's process group (nothing if it has ended)."""
        try:
            os.killpg(self.popen.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float | None = None) -> ChildResult | None:
        """Wait for the child to end (None: still running after `timeout` seconds).

        A `KeyboardInterrupt` (Ctrl-C) or `Terminated` (SIGTERM) raised while waiting is
        forwarded to the child as SIGINT / SIGTERM, the child is waited for, and the
        exception is raised again.
        """
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        except KeyboardInterrupt as e:
            self.signal(signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
            self.stop()
            raise
        return self._finish()

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Wait up to `grace` seconds for a signalled child, then kill it (at once on a second signal)."""
        try:
            self.popen.wait(grace)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            self.kill()
        self._finish()

    def kill(self) -> None:
        """SIGKILL the child's process group and reap it."""
        self.signal(signal.SIGKILL)
        self.popen.wait()

    def _finish(self) -> ChildResult:
        for thread in self._threads:
            thread.join(5.0)
        with self._lock:
            if not self._log.closed:
                self._log.close()
        return ChildResult(self.popen.returncode, tuple(self.tail))
