"""One owner per work directory: the lock (a file on local disk, an object with generation
preconditions in a bucket), stale locks, and a run that lost its lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from metatrain.errors import FaultError
from metatrain.io.storage import as_path
from metatrain.run import lock as lock_module
from metatrain.run.layout import LOCK_FILE
from metatrain.run.lock import STALE_AFTER_S, ObjectLock, WorkdirLock, WorkdirLocked
from metatrain.train.hooks import FunctionHook
from metatrain.train.loop import Trainer, train

from ..conftest import TINY, error_lines, run_cli, tiny_config


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_trainer_on_a_held_directory_exits_2_naming_the_holder_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    # The holder is another process: a real `metatrain train` run held at its start.
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from pathlib import Path; from metatrain.run.lock import WorkdirLock\n"
            f"lock = WorkdirLock(Path({str(workdir)!r})); lock.acquire(); print('held', flush=True); time.sleep(120)"
        )],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        done = run_cli("train", "--config", str(TINY), "--workdir", str(workdir), "--set", "trainer.steps=2")
        assert done.returncode == 2, done.stderr[-2000:]
        lines = error_lines(done.stderr)
        assert len(lines) == 1, lines
        assert f"pid {holder.pid} on host {socket.gethostname()}" in lines[0] and "in use by another trainer" in lines[0]
        assert time.monotonic() - started < 60  # at once: no training, no compilation
        assert sorted(p.name for p in workdir.iterdir()) == [LOCK_FILE]  # nothing else was written
    finally:
        holder.kill()
        holder.wait()


def test_two_locks_in_one_process_exclude_each_other_and_release(tmp_path):
    with WorkdirLock(tmp_path):
        with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()}"):
            WorkdirLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    with WorkdirLock(tmp_path):  # released: it can be taken again
        pass


def test_a_stale_lock_of_a_dead_process_on_this_host_is_taken_over_with_a_warning(tmp_path, capfd):
    record = {"host": socket.gethostname(), "pid": _dead_pid(), "started": time.time() - 60}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    summary = train(tiny_config("trainer.steps=1", "trainer.eval_every=0"), tmp_path)
    assert summary.final_step == 1
    err = capfd.readouterr().err
    assert f"taking over the stale lock {tmp_path / LOCK_FILE} of pid {record['pid']}" in err
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_honoured_while_its_heartbeat_is_fresh(tmp_path, capfd):
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"host": "other-vm-7", "pid": 4242, "started": time.time()}))
    with pytest.raises(WorkdirLocked, match=r"pid 4242 on host other-vm-7 .* last heartbeat \d+ s ago"):
        WorkdirLock(tmp_path).acquire()
    assert json.loads(lock.read_text())["host"] == "other-vm-7"  # the holder's file is untouched
    # A run rescheduled onto a new VM after a preemption: the old host's lock goes stale.
    old = time.time() - STALE_AFTER_S - 5
    os.utime(lock, (old, old))
    with WorkdirLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "taking over the stale lock" in capfd.readouterr().err


@pytest.mark.bucket
def test_the_lock_in_a_bucket_is_exclusive_and_a_stale_one_is_taken_over(bucket, monkeypatch, capsys):
    workdir = f"{bucket}/run"
    holder = ObjectLock(workdir)
    holder.acquire()
    try:
        with pytest.raises(WorkdirLocked) as refused:
            ObjectLock(workdir).acquire()
        message = str(refused.value)
        assert f"work directory {workdir} is in use by another trainer: pid {os.getpid()}" in message
        assert "last heartbeat" in message and f"delete {workdir}/train.lock" in message

        # Another host's lock whose heartbeat stopped: taken over, and its holder learns it lost.
        monkeypatch.setattr(lock_module, "STALE_AFTER_S", 0.0)
        monkeypatch.setattr(lock_module.socket, "gethostname", lambda: "rescheduled-vm")
        successor = ObjectLock(workdir)
        successor.acquire()
        assert "taking over the stale lock" in capsys.readouterr().err
        assert json.loads(as_path(f"{workdir}/train.lock").read_text())["host"] == "rescheduled-vm"
        holder._heartbeat_once()
        assert holder.lost and "lost the lock" in capsys.readouterr().err
        successor.release()
        assert not as_path(f"{workdir}/train.lock").exists()
    finally:
        holder.release()
    # A released lock is free again, and is taken without a warning.
    with ObjectLock(workdir):
        assert as_path(f"{workdir}/train.lock").exists()
        assert "taking over" not in capsys.readouterr().err
    assert not as_path(f"{workdir}/train.lock").exists()


def test_a_run_that_lost_its_lock_saves_no_further_checkpoint(store):
    workdir = f"{store}/run"
    config = tiny_config("trainer.steps=6", "checkpoint.every=2", "trainer.eval_every=0", "checkpoint.async_save=false")

    def lose_the_lock(info):
        if info.step == 2:  # as if another trainer had taken over the lock after a late heartbeat
            trainer.lock.lost = True

    trainer = Trainer(config, workdir, hooks=(FunctionHook(every=1, fn=lose_the_lock),))
    try:
        with pytest.raises(FaultError, match=f"another trainer took over the lock of {workdir}.*stopping without saving step 4"):
            trainer.run()
    finally:
        trainer.close()
    steps = {n.split("/")[0] for n in store.files("run/checkpoints")}
    assert steps == {"2"}


# -- what may be trained in: a new or empty directory, or a run's own ------------------------
