"""Errors meant for the person running metatrain, and the exit statuses they map to.

Every failure a user can meet is one of three kinds, each with its own exit status:

- `UserError`: something the user can fix (bad config, bad file, a refused resume, a
  work directory another trainer holds). Exit status 2.
- `DivergedError` (a `UserError`): training diverged (a non-finite loss). Exit status 3.
- `FaultError`: the machine or the filesystem failed (disk full, a read-only work
  directory, a checkpoint that cannot be saved, a corrupt token-cache chunk). Exit
  status 74. Nothing is lost: the last complete checkpoint stays.

The CLI prints the message as one line, without a traceback unless debugging is asked
for (`metatrain --debug ...` or `METATRAIN_DEBUG=1`). `EXIT_STATUSES` is the table the
README documents. (`metatrain.io.formats.RecordError` describes one bad input record.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
from collections.abc import Iterator

#: Exit statuses of every `metatrain` command (documented in the README).
EXIT_SUCCESS: int = 0
EXIT_INTERNAL: int = 1  # a bug: the traceback is printed
EXIT_USER_ERROR: int = 2
EXIT_DIVERGED: int = 3
EXIT_FAULT: int = 74  # EX_IOERR
EXIT_PREEMPTED: int = 75  # EX_TEMPFAIL: run the same command again to resume
EXIT_INTERRUPTED: int = 130
EXIT_TERMINATED: int = 143  # 128 + SIGTERM

EXIT_STATUSES: dict[int, str] = {
    EXIT_SUCCESS: "success",
    EXIT_INTERNAL: "internal error (a bug; the traceback is printed)",
    EXIT_USER_ERROR: "user error: config, input, a refused resume, a locked work directory",
    EXIT_DIVERGED: "divergence: the loss became NaN or infinite (the last good checkpoint is kept)",
    EXIT_FAULT: "fault: disk full, read-only work directory, failed save, corrupt file",
    EXIT_PREEMPTED: "preempted (SIGTERM): a checkpoint was saved; run the same command to resume",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C): nothing half-written is left",
    EXIT_TERMINATED: "terminated (SIGTERM) outside training: nothing half-written is left",
}

#: The longest error message printed whole; a longer one keeps its start and its end.
MAX_MESSAGE_CHARS: int = 2000



class MetatrainError(Exception):
    """Base of the errors the CLI reports in one line; `exit_code` is its exit status."""

    exit_code: int = EXIT_INTERNAL


class UserError(MetatrainError):
    """A problem the user can act on; the message says what, where and how to fix it."""

    exit_code = EXIT_USER_ERROR


class DivergedError(UserError):
    """Training diverged (non-finite loss); the message names the step and the checkpoint kept."""

    exit_code = EXIT_DIVERGED


class Terminated(KeyboardInterrupt):
    """SIGTERM outside training: unwinds like Ctrl-C, so temporaries are removed."""


class FaultError(MetatrainError):
    """The machine or the filesystem failed; the message names the path and the cause."""

    exit_code = EXIT_FAULT


def debug_enabled() -> bool:
    """Whether tracebacks are wanted (`METATRAIN_DEBUG=1`, also set by `metatrain --debug`)."""
    return os.environ.get("METATRAIN_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _related(error: BaseException):
    """`error`, its causes and contexts and exception-group members, breadth first."""
    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        todo.extend(getattr(e, "exceptions", ()) or ())


def os_error_in(error: BaseException) -> OSError | None:
    """The first `OSError` (with an errno) in `error`, its causes, contexts and group members."""
    return next((e for e in _related(error) if isinstance(e, OSError) and e.errno is not None), None)


def describe_cause(error: BaseException) -> str:
    """A one-line cause: `No space left on device [ENOSPC] (path)` when the OS said so,
    else the first line of the innermost error's message (wrappers such as orbax's
    restore errors put the useful words in their cause)."""
    os_error = os_error_in(error)
    if os_error is not None:
        name = errno.errorcode.get(os_error.errno, "")
        text = os_error.strerror or os.strerror(os_error.errno)
        where = f" ({os_error.filename})" if os_error.filename else ""
        return f"{text} [{name}]{where}"
    for e in _chain(error):
        code = re.search(r"os_error_code='(\d+)'", str(e))  # tensorstore's words for an OS error
        if code:
            number = int(code.group(1))
            return f"{os.strerror(number)} [{errno.errorcode.get(number, number)}]"
    chain = [e for e in _chain(error) if str(e).strip()]
    innermost = chain[-1] if chain else error
    lines = [line for line in str(innermost).splitlines() if line.strip()]
    first = lines[0].strip() if lines else type(innermost).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def _chain(error: BaseException) -> list[BaseException]:
    out, seen = [], set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def fault_from_os_error(error: BaseException, what: str) -> FaultError:
    """A `FaultError` saying `what` failed and why (for errors at the filesystem edge)."""
    return FaultError(f"{what}: {describe_cause(error)}")


def one_line(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` made safe to print: control characters (a newline in a user's value, an
    escape sequence) are escaped, and past `limit` characters the middle is cut, saying
    how much, so a message quoting a huge input stays readable.

    The one structure kept is an indented list: a newline followed by two spaces (a
    refused resume lists the changed keys that way), so no line of a message can pass
    for the start of another message.
    """
    if len(message) > limit:
        head, tail = message[: limit * 3 // 4], message[-(limit // 4):]
        message = f"{head} [... {len(message) - len(head) - len(tail):,} characters cut ...] {tail}"
    return "\n  ".join(_escaped(part) for part in message.split("\n  "))


def _escaped(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failed: Python's `MemoryError`, or XLA's RESOURCE_EXHAUSTED (on CPU
    an INTERNAL error saying "Out of memory"), in `error` or its causes."""
    return any(isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
               for e in _related(error))


#: Functions whose exceptions Python reports as "ignored" instead of raising them: an
#: exception a signal handler raises while one of them runs is lost (JAX frees buffers
#: from a garbage-collector callback, so a Ctrl-C can land there).
SWALLOWING_FUNCTIONS: frozenset[str] = frozenset({"_xla_gc_callback", "__del__"})


def raised_here_is_lost(frame) -> bool:
    """Whether an exception a signal handler raises at `frame` (its second argument)
    would be swallowed: the handler should arrange to act again a moment later."""
    while frame is not None:
        if frame.f_code.co_name in SWALLOWING_FUNCTIONS:
            return True
        frame = frame.f_back
    return False


_critical_depth = 0
_deferred: list[BaseException] = []


@contextlib.contextmanager
def critical_section() -> Iterator[None]:
    """Steps that must not be cut in two (publishing a model and its vocabulary): an
    interrupt that a handler defers (`defer_interrupt`) is raised when the block ends."""
    global _critical_depth
    _critical_depth += 1
    try:
        yield
    finally:
        _critical_depth -= 1
        if not _critical_depth and _deferred:
            raise _deferred.pop(0)


def defer_interrupt(error: BaseException) -> bool:
    """Keep `error` for the end of the current `critical_section`; False when none is open
    (the signal handler then raises it at once)."""
    if not _critical_depth:
        return False
    _deferred.append(error)
    return True


def find_metatrain_error(error: BaseException) -> MetatrainError | None:
    """`error` itself or the first `MetatrainError` among its causes and contexts (a worker
    process's error arrives wrapped in the data loader's own exception)."""
    return next((e for e in _related(error) if isinstance(e, MetatrainError)), None)


def exit_description(returncode: int) -> str:
    """How a child process ended, from its `returncode` (negative: the signal that killed
    it): "exited with status 2", "killed by SIGKILL"."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode}"
