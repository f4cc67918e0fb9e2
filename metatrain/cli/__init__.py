"""The `metatrain` command: parses arguments and hands off to the part that owns them.

Every command lives in this folder, one module per command group, each exposing
`register(subparsers)`; every subcommand sets `func(args) -> int`, which parses its
arguments and makes one call into the library that owns the work. Nothing below this
folder imports it (the import-linter contract in pyproject.toml).

Errors (`metatrain.errors`) are printed as one line and end the command with their exit
status (the README's table); an `OSError` that escaped the parts' own handling is a
fault (74) named the same way, and so is running out of host memory. Messages are
printed as one line whatever they quote (control characters escaped, the middle of a very
long one cut). `metatrain --debug ...` or `METATRAIN_DEBUG=1` prints the traceback as well.

Ctrl-C ends a command with 130 and SIGTERM with 143, both unwinding like an exception so
that no temporary or half-written output is left; `train` handles SIGTERM itself while it
trains (a checkpoint, then 75).

Commands that run on every process of a multi-host run (`DISTRIBUTED_COMMANDS`) first
join the run with `jax.distributed.initialize` when the environment says this is one
of several processes (`metatrain.launch.distributed`), before any device is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
import traceback
from typing import NoReturn

from metatrain.errors import (
    EXIT_FAULT,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    FaultError,
    MetatrainError,
    Terminated,
    debug_enabled,
    defer_interrupt,
    describe_cause,
    find_metatrain_error,
    is_out_of_memory,
    one_line,
    raised_here_is_lost,
)

COMMAND_MODULES: tuple[str, ...] = (
    "metatrain.cli.tokenizer",
    "metatrain.cli.data",
    "metatrain.cli.models",
    "metatrain.cli.train",
    "metatrain.cli.generate",
    "metatrain.cli.serve",
    "metatrain.cli.launch",
    "metatrain.cli.sweep",
    "metatrain.cli.generations",
    "metatrain.cli.annotate",
    "metatrain.cli.hf",
    "metatrain.cli.evaluation",
)

#: Commands that, started by a launcher on every host, join the run before they start.
DISTRIBUTED_COMMANDS: frozenset[str] = frozenset({"train", "eval", "annotate"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metatrain", description="Metacognitive pretraining in JAX."
    )
    parser.add_argument("--debug", action="store_true",
                        help="print tracebacks with errors (also METATRAIN_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from metatrain.hardware import quiet_libtpu_off_tpu

    quiet_libtpu_off_tpu()  # before any backend starts: no TPU-initialisation errors on CPU/GPU
    try:
        args = build_parser().parse_args(argv)
    except MetatrainError as e:  # an argument's type check (`as_path` of a malformed URL)
        words = sys.argv[1:] if argv is None else argv
        return _report(next((w for w in words if not w.startswith("-")), ""), e)
    if args.debug:
        os.environ["METATRAIN_DEBUG"] = "1"  # also seen by worker processes
    if not debug_enabled():
        _quiet_library_error_logs()
    previous = _signals_raise()
    try:
        if args.command in DISTRIBUTED_COMMANDS:
            from metatrain.launch.distributed import initialize_from_env

            initialize_from_env()
        return int(args.func(args) or 0)
    except Terminated:
        _say(f"metatrain {args.command}: terminated (SIGTERM)")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        _say(f"metatrain {args.command}: interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - every failure ends in one line and a documented status
        return _report(args.command, e)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run() -> NoReturn:
    """The `metatrain` executable: `main`, then exit with its status.

    After Ctrl-C or SIGTERM (every `finally` has run by then, so no temporary is left)
    the process ends without the interpreter's teardown: XLA may still be running a
    computation dispatched before the interrupt, and tearing the backend down under it
    crashes (a segmentation fault instead of 130). Once the status is decided, a late
    Ctrl-C cannot turn it into a traceback from an exit handler.
    """
    status = main()
    if status in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)


def _signals_raise() -> dict[int, object]:
    """Make SIGINT raise `KeyboardInterrupt` and SIGTERM `Terminated` in the main thread,
    each delivered again a moment later when it arrives inside a function whose exceptions
    are swallowed. Returns the previous handlers (none off the main thread, where no
    handler can be installed)."""

    def handler(signum, frame):
        if raised_here_is_lost(frame):
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        error = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        if not defer_interrupt(error):  # inside a critical section it is raised at its end
            raise error

    previous: dict[int, object] = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # `nohup`, a background job: still ignored
                previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread (an embedding application)
        pass
    return previous


def _quiet_library_error_logs() -> None:
    """Keep a failure to one line: orbax logs each failed background write with its
    traceback (through absl), and a failed read or write leaves coroutines and
    tensorstore callbacks whose errors Python reports as "ignored" at exit. Our own
    message says what failed and where."""
    import logging

    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # orbax's failed write tasks
    default_hook = sys.unraisablehook

    def from_checkpoint_io(unraisable) -> bool:
        if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
            return True
        frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
        return any("/orbax/" in f.filename or "/tensorstore/" in f.filename for f in frames)

    def hook(unraisable) -> None:
        if not from_checkpoint_io(unraisable):  # failed reads and writes are reported by us
            default_hook(unraisable)

    sys.unraisablehook = hook


def _say(line: str) -> None:
    """`line` on stderr in one write: `print` writes the text and its newline apart, and a
    library thread's traceback (orbax's event loops, under --debug) could land between."""
    sys.stderr.flush()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _report(command: str, error: Exception) -> int:
    """Print `error` in one line (its traceback too when debugging) and return its status."""
    known = find_metatrain_error(error)
    if known is None and isinstance(error, OSError):
        known = FaultError(describe_cause(error))
    if known is None and is_out_of_memory(error):
        known = FaultError(f"out of host memory ({describe_cause(error)}); give the command less to hold "
                           f"(a smaller batch, input or model) or a machine with more memory")
    if known is None:
        raise error  # a bug: the traceback is the report (exit status 1)
    if debug_enabled():
        traceback.print_exception(error)
    kind = "fault" if isinstance(known, FaultError) else "error"
    _say(f"metatrain {command}: {kind}: {one_line(str(known))}")
    return known.exit_code if isinstance(known.exit_code, int) else EXIT_FAULT
