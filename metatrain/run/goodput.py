"""Goodput: where a run's wall time goes, window by window and across restarts.

Every second of a training session, from the moment its `Trainer` is built, is given to
exactly one category, by what the host was doing then:

    step        dispatching train steps, and waiting for the device where the loop fetches
                (the metrics window's fetch, the wait before an evaluation)
    data        getting the next batch: reading, packing, placing it on the devices
    checkpoint  in the save call, and waiting for asynchronous saves to finish
    eval        evaluating on the held-out split
    compile     tracing, lowering and compiling jitted functions, from JAX's own monitoring
                events (`/jax/core/compile/*`: jaxpr trace, MLIR lowering, backend compile,
                a persistent-cache read included), taken out of the category it happened in
    other       the rest: building the program, restoring, initialising, writing metrics,
                hooks of your own

Steps are dispatched asynchronously: the host reads the next batch while the device still
runs the steps before it, and waits for them only where it fetches. `step` is that host
time (dispatch plus fetch), so the categories add up to the wall time exactly; a data
pipeline slower than the device shows as `data`, and the step share is then a lower
bound on how busy the device was.

Per metrics window (`trainer.log_every` steps) the window's seconds per category go into
`metrics.jsonl`, TensorBoard and W&B under `GOODPUT_PREFIX` (`GOODPUT_KEYS`). A window
covers the wall time since the previous record, so the checkpoint and evaluation that run
after a logged step count in the next window; one more record at the run's last step
(goodput keys only) covers the final evaluation, checkpoint and the wait for its save.

Restarts: `WORKDIR/GOODPUT_FILE` (process 0, written atomically at the session's start,
every checkpoint, at the end and between them as said below) keeps the run's totals, the session's last
step and when each checkpoint was taken. The next session to start in the directory
(after a preemption, a crash, a `kill -9`, or to train further) counts a restart: the
stopped session's wall time from the checkpoint it resumes from to the last step it
recorded is lost (those steps are trained again), and the time from its last record to
the new start is downtime (a session killed without warning loses its last window there).
Between checkpoints the file is rewritten at most every `WRITE_EVERY_S` seconds (each write
is an atomic replace with fsync: not once per step), so a session killed without warning
may leave up to that much of its end counted as downtime rather than lost. A session
started after one that had finished (to train further) is not a restart: the idle time
between them is left out of the run's wall time.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from metatrain.io.outputs import write_atomically
from metatrain.io.storage import as_path
from metatrain.run.layout import GOODPUT_FILE

GOODPUT_PREFIX = "goodput/"
#: What the host time of a session is spent on; each second goes to exactly one.
CATEGORIES = ("step", "data", "checkpoint", "eval", "compile", "other")
#: The metric keys of every window. `*_s` of the categories and `wall_s` are the window's
#: seconds; `share` is the training steps' share of wall time since the run began (steps
#: trained again after a restart and the downtime between sessions count against it),
#: `share_since_restart` the same over this session; `restarts`, `lost_s` (wall seconds
#: of work trained again) and `downtime_s` (seconds between a stop and the restart) are
#: the run's totals.
GOODPUT_KEYS = tuple(
    GOODPUT_PREFIX + k
    for k in ("wall_s", *(f"{c}_s" for c in CATEGORIES), "share", "share_since_restart", "restarts", "lost_s",
              "downtime_s")
)
COMPILE_EVENT_PREFIX = "/jax/core/compile/"
#: Seconds between rewrites of the state file in a bucket (checkpoints and the end always write).
WRITE_EVERY_S = 30.0
#: Checkpoint times kept in the state file (the newest).
KEPT_CHECKPOINT_TIMES = 64
_VERSION = 1


def _union_length(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by `spans` (nested compile events are counted once)."""
    total, end = 0.0, -math.inf
    for s, e in sorted(spans):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def account_restart(previous: dict[str, Any], start_step: int, started_at: float) -> dict[str, Any]:
    """What the restart from `previous` (the state file the stopped session left) cost.

    Args:
        previous: the parsed state file.
        start_step: the step this session resumes from (its checkpoint).
        started_at: when this session started (Unix seconds).

    Returns:
        `stopped_step`, `ended` (how the stopped session ended: "finished", "preempted",
        "stopped" by an error, or None: no record of its end), `redone_steps`, `lost_s`
        (its wall seconds from the checkpoint resumed from, or from its own start, to its
        last recorded step), `redone_step_s` (the step seconds among them) and `downtime_s`.
    """
    session = previous["session"]
    stopped = int(session["step"])
    cost = {"stopped_step": stopped, "ended": session.get("ended"), "redone_steps": 0, "lost_s": 0.0,
            "redone_step_s": 0.0, "downtime_s": max(0.0, started_at - float(session["last_seen_at"]))}
    if stopped <= start_step:
        return cost
    # The newest time a checkpoint at or before the resumed step was taken; a session's own
    # start counts as one (it resumed from there), and nothing before it is this restart's.
    taken = [c for c in previous.get("checkpoints", ()) if int(c["step"]) <= start_step]
    since, step_since = float(session["started_at"]), float(session["step_s_at_start"])
    if taken:
        since, step_since = max(since, float(taken[-1]["at"])), max(step_since, float(taken[-1]["step_s"]))
    cost["redone_steps"] = stopped - max(start_step, int(session["start_step"]))
    cost["lost_s"] = max(0.0, float(session["last_step_at"]) - since)
    cost["redone_step_s"] = max(0.0, float(previous["seconds"]["step"]) - step_since)
    return cost


def _valid(state: Any) -> bool:
    """Whether `state` is a state file this version reads (every number where one belongs)."""
    try:
        s = state["session"]
        numbers = [state[k] for k in ("run_started_at", "restarts", "lost_s", "redone_step_s", "downtime_s")]
        numbers += [state["seconds"][c] for c in CATEGORIES]
        numbers += [s[k] for k in ("started_at", "start_step", "step_s_at_start", "step", "last_step_at",
                                   "last_seen_at")]
        numbers += [c[k] for c in state["checkpoints"] for k in ("step", "at", "step_s")]
        return state["version"] == _VERSION and all(
            isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) for n in numbers)
    except (KeyError, TypeError, IndexError):
        return False


class Goodput:
    """The time accounting of one training session and of the run it continues.

    Built when the session starts (the clock starts then); `timing(category)` gives the
    host time inside to a category; `begin` reads what an earlier session left and counts
    the restart; `window` closes a metrics window and returns its metrics; `listening()`
    collects JAX's compile events while the run trains.

    Args:
        workdir: the run's work directory (the state file goes there).
        enabled: read and write the state file (process 0 only).
    """

    def __init__(self, workdir: Path, *, enabled: bool = True):
        self.path = as_path(workdir) / GOODPUT_FILE
        self.enabled = enabled
        self._started_at = time.time()
        self._started = self._mark = self._window_start = time.perf_counter()
        self._stack = ["other"]  # the innermost category gets the time
        self._window = dict.fromkeys(CATEGORIES, 0.0)
        self._spans: dict[str, list[tuple[float, float]]] = {}  # compile events, by the category they interrupted
        self._session = dict.fromkeys(CATEGORIES, 0.0)
        self._before = dict.fromkeys(CATEGORIES, 0.0)  # earlier sessions' seconds
        self._run_started_at = self._started_at
        self._restarts, self._lost_s, self._redone_step_s, self._downtime_s = 0, 0.0, 0.0, 0.0
        self._checkpoints: list[dict[str, Any]] = []
        self._start_step = self._step = 0
        self._last_step_at = self._started_at
        self._begun = False
        self._thread: int | None = None
        self._last_write = -math.inf
        self._warned = False
        self.restart: dict[str, Any] | None = None  # what this session's restart cost (`account_restart`)

    # -- measuring ------------------------------------------------------------------
    def _settle(self) -> None:
        now = time.perf_counter()
        self._window[self._stack[-1]] += now - self._mark
        self._mark = now

    @contextlib.contextmanager
    def timing(self, category: str) -> Iterator[None]:
        """Give the host time inside to `category` (one of `CATEGORIES`; the innermost wins)."""
        self._settle()
        self._stack.append(category)
        try:
            yield
        finally:
            self._settle()
            self._stack.pop()

    def _on_span(self, event: str, start_time: float, end_time: float, **_: Any) -> None:
        if event.startswith(COMPILE_EVENT_PREFIX) and threading.get_ident() == self._thread:
            self._spans.setdefault(self._stack[-1], []).append((start_time, end_time))

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        """Count JAX's compile events on this thread as `compile` while inside."""
        from jax import monitoring

        self._thread = threading.get_ident()
        monitoring.register_event_time_span_listener(self._on_span)
        try:
            yield
        finally:
            monitoring.unregister_event_time_span_listener(self._on_span)

    def _open_window(self) -> dict[str, float]:
        """The current window's seconds so far, compile events taken out of their categories."""
        self._settle()
        seconds = dict(self._window)
        for category, spans in self._spans.items():
            taken = min(_union_length(spans), seconds[category])
            seconds[category] -= taken
            seconds["compile"] += taken
        return seconds

    # -- the run's totals -------------------------------------------------------------
    def _seconds(self, window: dict[str, float] | None = None) -> dict[str, float]:
        """Every session's seconds per category (this one's up to now, or to its last window)."""
        return {c: self._before[c] + self._session[c] + (window[c] if window else 0.0) for c in CATEGORIES}

    def _shares(self, window: dict[str, float] | None = None) -> tuple[float, float]:
        """(since the run began, since the last restart)."""
        seconds = self._seconds(window)
        session_step = self._session["step"] + (window["step"] if window else 0.0)
        wall = time.time() - self._run_started_at
        session_wall = time.perf_counter() - self._started
        since_start = (seconds["step"] - self._redone_step_s) / wall if wall > 0 else 0.0
        since_restart = session_step / session_wall if session_wall > 0 else 0.0
        # Clocks of other machines (an earlier session's) may disagree a little.
        return min(1.0, max(0.0, since_start)), min(1.0, max(0.0, since_restart))

    # -- the session --------------------------------------------------------------------
    def begin(self, start_step: int) -> str | None:
        """Start accounting the session at `start_step` (after its restore): read what an
        earlier session left, count the restart and record this start.

        Returns:
            A line saying what the restart cost, or None for a run's first session.
        """
        self._start_step = self._step = start_step
        previous = self._read() if self.enabled else None
        message = None
        if previous is not None and previous["session"].get("ended") == "finished":
            # Trained further after a run that had finished: not a restart. The time between
            # is neither the run's nor lost; the run's clock skips it.
            idle = max(0.0, self._started_at - float(previous["session"]["last_seen_at"]))
            self._run_started_at = float(previous["run_started_at"]) + idle
            self._restarts = int(previous["restarts"])
            self._lost_s, self._redone_step_s = float(previous["lost_s"]), float(previous["redone_step_s"])
            self._downtime_s = float(previous["downtime_s"])
            self._before = {c: float(previous["seconds"][c]) for c in CATEGORIES}
            self._checkpoints = list(previous["checkpoints"])
        elif previous is not None:
            self.restart = account_restart(previous, start_step, self._started_at)
            self._run_started_at = float(previous["run_started_at"])
            self._restarts = int(previous["restarts"]) + 1
            self._lost_s = float(previous["lost_s"]) + self.restart["lost_s"]
            self._redone_step_s = float(previous["redone_step_s"]) + self.restart["redone_step_s"]
            self._downtime_s = float(previous["downtime_s"]) + self.restart["downtime_s"]
            self._before = {c: float(previous["seconds"][c]) for c in CATEGORIES}
            self._checkpoints = list(previous["checkpoints"])
            message = _restart_line(self._restarts, self.restart, start_step)
        self._checkpoints.append({"step": start_step, "at": self._started_at, "step_s": self._before["step"]})
        self._begun = True
        self._write(force=True)
        return message

    def checkpoint_saved(self, step: int) -> None:
        """Record that the save of `step` was handed to the checkpointer now."""
        window = self._open_window()
        self._checkpoints.append({"step": step, "at": time.time(), "step_s": self._seconds(window)["step"]})
        self._write(force=True, window=window)

    def window(self, step: int, *, stepped: bool = True) -> dict[str, float | int]:
        """Close the metrics window at `step` and return its metrics (`GOODPUT_KEYS`).

        Args:
            step: the window's last step.
            stepped: the window ends with a step just trained (not the run's tail after it).
        """
        seconds = self._open_window()
        now = self._mark  # where `_open_window` settled the time: windows tile the session exactly
        wall = now - self._window_start
        self._window_start = now
        self._window = dict.fromkeys(CATEGORIES, 0.0)
        self._spans = {}
        for c in CATEGORIES:
            self._session[c] += seconds[c]
        self._step = step
        if stepped:
            self._last_step_at = time.time()
        since_start, since_restart = self._shares()
        self._write(force=False)
        p = GOODPUT_PREFIX
        return {
            f"{p}wall_s": wall,
            **{f"{p}{c}_s": seconds[c] for c in CATEGORIES},
            f"{p}share": since_start,
            f"{p}share_since_restart": since_restart,
            f"{p}restarts": self._restarts,
            f"{p}lost_s": self._lost_s,
            f"{p}downtime_s": self._downtime_s,
        }

    def end(self, step: int, *, preempted: bool) -> None:
        """The session ended normally at `step` (its last window closed)."""
        self._step = step
        self._write(force=True, ended="preempted" if preempted else "finished")

    def step_done(self, step: int) -> None:
        """The step `step` was dispatched now (how far a session that stops got, and when)."""
        self._step, self._last_step_at = step, time.time()

    def stopped(self, step: int, *, preempted: bool = False) -> None:
        """The session stops at `step` with an error, or a SIGTERM (`preempted`): record how
        far it got. Quiet: a write that fails here would hide the error that matters."""
        if not self._begun:
            return
        self._step = max(self._step, step)
        self._write(force=True, window=self._open_window(), ended="preempted" if preempted else "stopped", quiet=True)

    def summary(self) -> dict[str, Any]:
        """The session's seconds per category, its wall time, and the run's shares and restarts."""
        since_start, since_restart = self._shares()
        return {
            "seconds": dict(self._session),
            "session_s": time.perf_counter() - self._started,
            "share": since_start,
            "share_since_restart": since_restart,
            "restarts": self._restarts,
            "lost_s": self._lost_s,
            "downtime_s": self._downtime_s,
        }

    # -- the state file -----------------------------------------------------------------
    def _read(self) -> dict[str, Any] | None:
        try:
            if not self.path.is_file():
                return None
            state = json.loads(self.path.read_text(encoding="utf-8"))
        except Exception as e:  # noqa: BLE001 - bookkeeping never stops training (a store's errors too)
            self._warn(f"cannot read {self.path} ({e}); goodput counts from this session")
            return None
        if not _valid(state):
            self._warn(f"{self.path} is not a goodput record this version reads; goodput counts from this session")
            return None
        return state

    def _write(self, *, force: bool, window: dict[str, float] | None = None, ended: str | None = None,
               quiet: bool = False) -> None:
        if not self.enabled or not self._begun:
            return
        if not force and time.monotonic() - self._last_write < WRITE_EVERY_S:
            return
        state = {
            "version": _VERSION,
            "run_started_at": self._run_started_at,
            "restarts": self._restarts,
            "lost_s": self._lost_s,
            "redone_step_s": self._redone_step_s,
            "downtime_s": self._downtime_s,
            "seconds": self._seconds(window),
            "session": {
                "started_at": self._started_at,
                "start_step": self._start_step,
                "step_s_at_start": self._before["step"],
                "step": self._step,
                "last_step_at": self._last_step_at,
                "last_seen_at": time.time(),
                "ended": ended,
            },
            "checkpoints": self._checkpoints[-KEPT_CHECKPOINT_TIMES:],
        }
        try:
            write_atomically(self.path, json.dumps(state, indent=1) + "\n", option="the goodput record")
        except Exception as e:  # noqa: BLE001 - bookkeeping never stops training
            if not quiet:
                self._warn(f"cannot write {self.path} ({e}); a restart from here may not be counted")
            return
        self._last_write = time.monotonic()

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            print(f"metatrain train: {message}", file=sys.stderr, flush=True)


def _restart_line(number: int, cost: dict[str, Any], start_step: int) -> str:
    how = {"finished": "had finished", "preempted": "was preempted", "stopped": "stopped with an error"}.get(
        cost["ended"], "was killed or crashed (no record of its end)")
    redone = cost["redone_steps"]
    return (f"restart {number} of this run: the last session {how} at step {cost['stopped_step']}; resuming from "
            f"step {start_step} trains {redone} step{'' if redone == 1 else 's'} again ({cost['lost_s']:.1f} s lost), "
            f"after {cost['downtime_s']:.1f} s down")


def format_goodput(summary: dict[str, Any]) -> str:
    """One line from `Goodput.summary()`: the shares, this session's seconds, the restarts."""
    s = summary["seconds"]
    parts = ", ".join(f"{c} {s[c]:.1f}" for c in CATEGORIES)
    restarts = summary["restarts"]
    line = (f"goodput {summary['share']:.1%} of wall time in training steps since the run began "
            f"({summary['share_since_restart']:.1%} this session); this session {summary['session_s']:.1f} s: {parts}")
    if restarts:
        line += (f"; {restarts} restart{'' if restarts == 1 else 's'}: {summary['lost_s']:.1f} s lost, "
                 f"{summary['downtime_s']:.1f} s down")
    return line
