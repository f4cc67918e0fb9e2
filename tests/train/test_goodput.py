"""Goodput in the run's own metrics: every window says where its wall time went (step,
data, checkpoint, eval, compile, other), the run ends with one line saying so, and a
restart (an error, a preemption, `kill -9`) is counted with the time it lost.

The accounting of a restart is checked on its own (`account_restart`, by hand-made state
files) and end to end on the tiny preset. No test asserts how long anything took: only
that the seconds add up, land in the right category and are counted where they should be.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from metatrain.config import load_config
from metatrain.io.storage import as_path
from metatrain.run.goodput import (
    CATEGORIES,
    GOODPUT_KEYS,
    Goodput,
    account_restart,
)
from metatrain.run.layout import GOODPUT_FILE
from metatrain.train.hooks import FunctionHook
from metatrain.train.loop import format_summary, train

from ..conftest import STEPS, read_records, tiny_config

CATEGORY_KEYS = [f"goodput/{c}_s" for c in CATEGORIES]


def goodput_records(workdir) -> list[dict]:
    return [r for r in read_records(as_path(workdir)) if "goodput/wall_s" in r]


def state(workdir) -> dict:
    return json.loads((as_path(workdir) / GOODPUT_FILE).read_text())


# -- a run from start to end -------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The tiny preset for 6 steps: a window every step, evaluations and checkpoints at 3 and 6."""
    workdir = tmp_path_factory.mktemp("goodput")
    summary = train(tiny_config(), workdir)
    return workdir, summary


def test_every_window_says_where_its_wall_time_went(run):
    workdir, _ = run
    windows = [r for r in goodput_records(workdir) if "loss" in r]
    assert [r["step"] for r in windows] == list(range(1, STEPS + 1))
    for r in windows:
        assert set(GOODPUT_KEYS) <= set(r), set(GOODPUT_KEYS) - set(r)
        seconds = [r[k] for k in CATEGORY_KEYS]
        assert min(seconds) >= 0, r
        # Every second of the window goes to exactly one category.
        assert sum(seconds) == pytest.approx(r["goodput/wall_s"], rel=1e-6, abs=1e-6), r
        assert r["goodput/step_s"] > 0
        assert 0 <= r["goodput/share"] <= 1 and 0 <= r["goodput/share_since_restart"] <= 1
        assert r["goodput/restarts"] == 0 and r["goodput/lost_s"] == 0 and r["goodput/downtime_s"] == 0
    first = windows[0]
    assert first["goodput/compile_s"] > 0  # the train step (and the initialisation) compiled
    # The checkpoint and evaluation after step 3 are in the window that follows it, and only there.
    by_step = {r["step"]: r for r in windows}
    assert by_step[4]["goodput/checkpoint_s"] > 0 and by_step[4]["goodput/eval_s"] > 0
    assert by_step[4]["goodput/compile_s"] > 0  # the eval step compiles at its first use
    for quiet in (1, 2, 3, 5, 6):
        assert by_step[quiet]["goodput/checkpoint_s"] == 0 and by_step[quiet]["goodput/eval_s"] == 0, quiet
    for later in (2, 3, 5, 6):
        assert by_step[later]["goodput/compile_s"] == 0, later


def test_the_time_after_the_last_window_is_one_more_record_at_the_last_step(run):
    workdir, _ = run
    records = goodput_records(workdir)
    tail = records[-1]
    assert tail["step"] == STEPS and "loss" not in tail and set(tail) == {"step", *GOODPUT_KEYS}
    # The final evaluation and checkpoint (and the wait for its asynchronous save).
    assert tail["goodput/eval_s"] > 0 and tail["goodput/checkpoint_s"] > 0
    assert sum(tail[k] for k in CATEGORY_KEYS) == pytest.approx(tail["goodput/wall_s"], rel=1e-6, abs=1e-6)


def test_the_summary_adds_up_the_windows_and_is_printed(run):
    workdir, summary = run
    g = summary.goodput
    records = goodput_records(workdir)
    for c in CATEGORIES:
        assert g["seconds"][c] == pytest.approx(sum(r[f"goodput/{c}_s"] for r in records), rel=1e-6, abs=1e-6), c
    assert sum(g["seconds"].values()) <= g["session_s"]
    assert 0 < g["share"] <= 1 and g["share"] == pytest.approx(g["share_since_restart"], rel=1e-3)
    line = [line for line in format_summary(summary).splitlines() if line.startswith("goodput ")]
    assert len(line) == 1 and "this session" in line[0] and "compile" in line[0] and "restart" not in line[0]
    saved = state(workdir)
    assert saved["session"]["ended"] == "finished" and saved["session"]["step"] == STEPS
    assert [c["step"] for c in saved["checkpoints"]] == [0, 3, 6]
    assert saved["restarts"] == 0


def test_the_end_of_a_run_is_one_line_on_stderr(tmp_path, capsys):
    train(tiny_config("trainer.steps=2", "trainer.eval_every=0", "checkpoint.every=2"), tmp_path)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("metatrain train: goodput ")]
    assert len(lines) == 1, lines
    assert "of wall time in training steps since the run began" in lines[0]
    assert all(f" {c} " in lines[0] for c in CATEGORIES), lines[0]


# -- restarts -------------------------------------------------------------------------------


def test_training_a_finished_run_further_is_not_a_restart_and_a_rerun_adds_no_row(tmp_path, capsys):
    config = tiny_config("trainer.steps=2", "trainer.eval_every=0", "checkpoint.every=2")
    train(config, tmp_path)
    rows = len(read_records(tmp_path))
    first = state(tmp_path)
    time.sleep(0.5)  # idle between the sessions: neither the run's time nor downtime
    train(config, tmp_path)  # already at trainer.steps: trains nothing
    assert len(read_records(tmp_path)) == rows
    capsys.readouterr()
    summary = train(tiny_config("trainer.steps=4", "trainer.eval_every=0", "checkpoint.every=2"), tmp_path)
    assert "restart" not in capsys.readouterr().err
    g = summary.goodput
    assert g["restarts"] == 0 and g["lost_s"] == 0 and g["downtime_s"] == 0
    later = state(tmp_path)
    assert later["run_started_at"] - first["run_started_at"] >= 0.5
    assert later["seconds"]["step"] > first["seconds"]["step"]



def test_a_run_stopped_by_an_error_is_a_restart_with_its_steps_after_the_checkpoint_lost(tmp_path, capsys):
    config = tiny_config("trainer.eval_every=0")

    class Crash(Exception):
        pass

    def crash_at_5(info):
        if info.step == 5:  # the checkpoint of step 3 is kept; steps 4 and 5 are trained again
            raise Crash()

    with pytest.raises(Crash):
        train(config, tmp_path, hooks=(FunctionHook(every=1, fn=crash_at_5),))
    stopped = state(tmp_path)
    assert stopped["session"]["ended"] == "stopped" and stopped["session"]["step"] == 5
    first_steps = stopped["seconds"]["step"]
    capsys.readouterr()

    summary = train(config, tmp_path)
    assert summary.start_step == 3
    err = capsys.readouterr().err
    assert ("metatrain train: restart 1 of this run: the last session stopped with an error at step 5; "
            "resuming from step 3 trains 2 steps again (") in err, err
    g = summary.goodput
    assert g["restarts"] == 1 and g["lost_s"] > 0 and g["downtime_s"] > 0
    assert "1 restart: " in format_summary(summary)
    resumed = [r for r in goodput_records(tmp_path) if r["goodput/restarts"] == 1]
    assert resumed and all(r["goodput/lost_s"] == g["lost_s"] for r in resumed)
    assert all(0 <= r["goodput/share"] <= 1 for r in resumed)
    saved = state(tmp_path)
    assert saved["restarts"] == 1 and saved["session"]["ended"] == "finished"
    assert saved["seconds"]["step"] > first_steps  # both sessions' steps
    assert 0 < saved["redone_step_s"] < first_steps  # steps 4 and 5 of the first, not 1 to 3


def test_a_preempted_run_in_a_bucket_is_a_restart_that_lost_nothing(bucket_store):
    workdir = f"{bucket_store}/run"
    config = tiny_config("trainer.eval_every=0", "checkpoint.every=10")

    def preempt_at_4(info):
        if info.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler does; the run saves at the next step

    first = train(config, workdir, hooks=(FunctionHook(every=1, fn=preempt_at_4),))
    assert first.preempted and first.final_step == 5
    stopped = state(workdir)
    assert stopped["session"]["ended"] == "preempted" and stopped["checkpoints"][-1]["step"] == 5

    summary = train(config, workdir)
    assert summary.start_step == 5 and summary.final_step == STEPS
    g = summary.goodput
    assert g["restarts"] == 1 and g["lost_s"] == 0 and g["downtime_s"] > 0
    records = goodput_records(workdir)
    assert [r["goodput/restarts"] for r in records if r["step"] == STEPS] == [1, 1]
    assert state(workdir)["restarts"] == 1


_KILLED_AT_5 = """
import os, signal, sys, time
from pathlib import Path
from metatrain.config import load_config
from metatrain.train.hooks import FunctionHook
from metatrain.run import goodput
from metatrain.train.loop import train

goodput.WRITE_EVERY_S = 0.0  # every window on disk (by default at most every 30 s: see the next test)
workdir = Path(sys.argv[1])
def kill_at_5(info):
    if info.step == 5:  # once the checkpoint of step 3 is complete: steps 4 and 5 are lost
        deadline = time.monotonic() + 120
        while not (workdir / "checkpoints" / "3").is_dir() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
train(load_config(sys.argv[2], sys.argv[3:]), workdir, hooks=(FunctionHook(every=1, fn=kill_at_5),))
"""


@pytest.mark.slow
def test_a_run_killed_without_warning_leaves_enough_to_count_its_restart(tmp_path):
    overrides = ["trainer.eval_every=0", "mesh.data=2"]
    config = tiny_config(*overrides)
    config_file = tmp_path / "config.yaml"
    from metatrain.config import save_config

    save_config(config, config_file)
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run([sys.executable, "-c", _KILLED_AT_5, str(workdir), str(config_file)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    left = state(workdir)
    assert left["session"]["ended"] is None and left["session"]["step"] == 5  # the window of step 5 was written

    started = time.time()
    summary = train(load_config(config_file), workdir, devices=jax.devices()[:2])
    assert summary.start_step == 3
    cost = account_restart(left, 3, started)
    assert cost["ended"] is None and cost["redone_steps"] == 2 and cost["lost_s"] > 0
    g = summary.goodput
    assert g["restarts"] == 1 and g["lost_s"] == pytest.approx(cost["lost_s"]) and g["downtime_s"] > 0


def test_the_record_is_rewritten_at_checkpoints_and_at_most_every_write_interval_between(tmp_path, monkeypatch):
    """Each write is an atomic replace with fsync: not once per step."""
    from metatrain.run import goodput

    clock = [1000.0]
    monkeypatch.setattr(goodput.time, "monotonic", lambda: clock[0])
    g = Goodput(tmp_path)
    g.begin(0)
    g.window(1)
    assert state(tmp_path)["session"]["step"] == 0  # within WRITE_EVERY_S of the start's write
    clock[0] += goodput.WRITE_EVERY_S
    g.window(2)
    assert state(tmp_path)["session"]["step"] == 2
    g.window(3)
    g.checkpoint_saved(3)
    assert [c["step"] for c in state(tmp_path)["checkpoints"]] == [0, 3]


# -- the accounting, by hand --------------------------------------------------------------


def _left(*, step: int, start_step: int = 0, started_at: float = 100.0, last_step_at: float, last_seen_at: float,
          checkpoints, step_s: float, step_s_at_start: float = 0.0, ended=None) -> dict:
    return {
        "version": 1, "run_started_at": 100.0, "restarts": 0, "lost_s": 0.0, "redone_step_s": 0.0,
        "downtime_s": 0.0, "seconds": {c: (step_s if c == "step" else 0.0) for c in CATEGORIES},
        "session": {"started_at": started_at, "start_step": start_step, "step_s_at_start": step_s_at_start,
                    "step": step, "last_step_at": last_step_at, "last_seen_at": last_seen_at, "ended": ended},
        "checkpoints": [{"step": s, "at": at, "step_s": ss} for s, at, ss in checkpoints],
    }


def test_the_lost_time_runs_from_the_checkpoint_resumed_from_to_the_last_step_recorded():
    left = _left(step=9, last_step_at=190.0, last_seen_at=191.0, step_s=50.0,
                 checkpoints=[(0, 100.0, 0.0), (3, 130.0, 20.0), (6, 160.0, 35.0)])
    cost = account_restart(left, 6, started_at=200.0)
    assert cost == {"stopped_step": 9, "ended": None, "redone_steps": 3, "lost_s": 30.0, "redone_step_s": 15.0,
                    "downtime_s": 9.0}
    # The checkpoint of step 6 was damaged: the run resumes from 3 and loses more.
    cost = account_restart(left, 3, started_at=200.0)
    assert (cost["redone_steps"], cost["lost_s"], cost["redone_step_s"]) == (6, 60.0, 30.0)


def test_a_session_that_stopped_at_its_checkpoint_lost_nothing_but_its_downtime():
    left = _left(step=6, last_step_at=160.0, last_seen_at=165.0, step_s=35.0, ended="preempted",
                 checkpoints=[(0, 100.0, 0.0), (6, 161.0, 35.0)])
    assert account_restart(left, 6, started_at=175.0) == {
        "stopped_step": 6, "ended": "preempted", "redone_steps": 0, "lost_s": 0.0, "redone_step_s": 0.0,
        "downtime_s": 10.0}


def test_a_second_crash_before_a_new_checkpoint_loses_only_its_own_session():
    # Session 1 checkpointed step 3 at 130 and was lost (counted then); session 2 resumed at
    # 3 (its own start, at 200, is where its loss begins) and died at step 5.
    left = _left(step=5, start_step=3, started_at=200.0, last_step_at=220.0, last_seen_at=221.0, step_s=30.0,
                 step_s_at_start=25.0, checkpoints=[(0, 100.0, 0.0), (3, 130.0, 20.0), (3, 200.0, 25.0)])
    cost = account_restart(left, 3, started_at=230.0)
    assert (cost["redone_steps"], cost["lost_s"], cost["redone_step_s"], cost["downtime_s"]) == (2, 20.0, 5.0, 9.0)


def test_compile_events_are_taken_out_of_the_category_they_interrupted_and_counted_once(tmp_path):
    from jax import monitoring

    clock = Goodput(tmp_path, enabled=False)
    with clock.listening(), clock.timing("eval"):
        time.sleep(0.05)
        # A jaxpr trace of 0.03 s with a nested one inside it, as JAX reports a jit inside a jit.
        monitoring.record_event_time_span("/jax/core/compile/jaxpr_trace_duration", 10.0, 10.03)
        monitoring.record_event_time_span("/jax/core/compile/jaxpr_trace_duration", 10.01, 10.02)
        monitoring.record_event_time_span("/jax/other/event", 10.0, 11.0)  # not a compilation
    window = clock.window(1)
    assert window["goodput/compile_s"] == pytest.approx(0.03)
    assert window["goodput/eval_s"] > 0
    assert sum(window[k] for k in CATEGORY_KEYS) == pytest.approx(window["goodput/wall_s"])
    # Outside `listening()` nothing is collected.
    monitoring.record_event_time_span("/jax/core/compile/backend_compile_duration", 0.0, 5.0)
    assert clock.window(2)["goodput/compile_s"] == 0


@pytest.mark.parametrize("text, says", [
    ("{not json", "cannot read {path} ("),
    ('{"version": 1, "restarts": "two"}', "{path} is not a goodput record this version reads"),
])
def test_an_unreadable_state_file_is_one_line_and_counting_starts_afresh(tmp_path, capsys, text, says):
    (tmp_path / GOODPUT_FILE).write_text(text)
    clock = Goodput(tmp_path)
    assert clock.begin(0) is None
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line]
    assert line.startswith("metatrain train: " + says.format(path=tmp_path / GOODPUT_FILE)), line
    assert line.endswith("goodput counts from this session"), line
    assert state(tmp_path)["restarts"] == 0  # replaced by this session's record
