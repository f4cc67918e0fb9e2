"""A work directory in a bucket: training, preemption and exact resume, the lock and resume
validation, all against a GCS emulator (fake-gcs-server) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from metatrain.errors import EXIT_PREEMPTED
from metatrain.io.storage import as_path
from metatrain.run import workdir as workdir_module
from metatrain.run.workdir import ObjectLock, WorkdirLocked

from .conftest import TINY, error_lines, run_cli

STEPS = 60
ARGS = ("--config", str(TINY), "--set", f"trainer.steps={STEPS}", "--set", "trainer.log_every=1",
        "--set", "trainer.eval_every=20", "--set", "trainer.eval_batches=1", "--set", "trainer.progress=false",
        "--set", "checkpoint.every=5", "--set", "checkpoint.async_save=true")


def _env(emulator) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               STORAGE_EMULATOR_HOST=emulator.url)
    env.pop("METATRAIN_DEBUG", None)
    return env


def _losses(text: str) -> dict[int, float]:
    """Step -> loss from metrics.jsonl; a step logged twice (replayed after a resume) keeps its last value."""
    return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines()) if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run, uninterrupted, in a local work directory."""
    path = tmp_path_factory.mktemp("reference")
    done = run_cli("train", "--workdir", str(path), *ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    return _losses((path / "metrics.jsonl").read_text())


def test_a_run_in_a_bucket_is_preempted_and_resumes_exactly(reference, gcs_emulator):
    bucket = gcs_emulator.bucket()
    workdir = f"gs://{bucket}/runs/tiny"
    command = [sys.executable, "-m", "metatrain.cli", "train", "--workdir", workdir, *ARGS]
    first = subprocess.Popen(command, env=_env(gcs_emulator), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not any(n.endswith("checkpoints/10/commit_success.txt") for n in gcs_emulator.objects(bucket, "runs/tiny/")):
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint reached the bucket"
        time.sleep(0.05)
    assert "runs/tiny/train.lock" in gcs_emulator.objects(bucket, "runs/tiny/")
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=240)
    assert first.returncode == EXIT_PREEMPTED, err[-3000:]
    names = gcs_emulator.objects(bucket, "runs/tiny/")
    assert "runs/tiny/train.lock" not in names  # released on the way out
    steps = sorted({int(n.split("/")[3]) for n in names if n.startswith("runs/tiny/checkpoints/") and n.endswith("commit_success.txt")})
    stopped = steps[-1]
    assert 10 <= stopped < STEPS, steps
    # Every step up to the checkpoint it stopped at reached metrics.jsonl in the bucket.
    logged = _losses(as_path(f"{workdir}/metrics.jsonl").read_text())
    assert set(range(1, stopped + 1)) <= set(logged)
    assert not any(n.startswith("runs/tiny/metrics.jsonl.part") for n in names)
    for name in ("config.yaml", "tokenizer.model", "tags.yaml"):
        assert f"runs/tiny/{name}" in names
    assert any(n.startswith("runs/tiny/tensorboard/events.out.tfevents") for n in names)

    # The same command again: it resumes from the checkpoint in the bucket to the end.
    again = run_cli("train", "--workdir", workdir, *ARGS, env={"STORAGE_EMULATOR_HOST": gcs_emulator.url})
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"trained steps {stopped} -> {STEPS}" in again.stdout
    resumed = _losses(as_path(f"{workdir}/metrics.jsonl").read_text())
    for step in range(1, STEPS + 1):  # CPU runs are exact
        assert resumed[step] == reference[step], f"step {step}: {resumed[step]} != {reference[step]}"


def test_a_changed_model_is_refused_in_the_bucket_and_nothing_is_written(gcs_emulator):
    bucket = gcs_emulator.bucket()
    workdir = f"gs://{bucket}/run"
    short = [a if a != f"trainer.steps={STEPS}" else "trainer.steps=2" for a in ARGS]
    done = run_cli("train", "--workdir", workdir, *short, env={"STORAGE_EMULATOR_HOST": gcs_emulator.url})
    assert done.returncode == 0, done.stderr[-3000:]
    before = {n: as_path(f"gs://{bucket}/{n}").read_bytes() for n in gcs_emulator.objects(bucket)}
    refused = run_cli("train", "--workdir", workdir, *short, "--set", "model.d_ff=192",
                      env={"STORAGE_EMULATOR_HOST": gcs_emulator.url})
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = error_lines(refused.stderr)
    assert any(f"cannot resume {workdir}" in line for line in lines), lines
    assert any("model.d_ff: 176 -> 192" in line for line in lines), lines
    assert "Traceback" not in refused.stderr
    after = {n: as_path(f"gs://{bucket}/{n}").read_bytes() for n in gcs_emulator.objects(bucket)}
    assert after == before


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
        monkeypatch.setattr(workdir_module, "STALE_AFTER_S", 0.0)
        monkeypatch.setattr(workdir_module.socket, "gethostname", lambda: "rescheduled-vm")
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


def test_a_damaged_checkpoint_in_a_bucket_is_moved_aside_and_the_next_restores(gcs_emulator, tmp_path, capfd):
    from metatrain.train.loop import train

    from .conftest import tiny_config, train_losses

    config = tiny_config("trainer.steps=6", "checkpoint.every=2", "trainer.eval_every=0")
    train(config, tmp_path)  # the reference, uninterrupted, on local disk
    bucket = gcs_emulator.bucket()
    workdir = f"gs://{bucket}/run"
    train(config, workdir)
    for name in gcs_emulator.objects(bucket, "run/checkpoints/6/state/"):
        if "/d/" in name:  # every array of step 6 zeroed
            blob = as_path(f"gs://{bucket}/{name}")
            blob.write_bytes(bytes(len(blob.read_bytes())))
    capfd.readouterr()
    summary = train(config, workdir)
    assert summary.start_step == 4 and summary.final_step == 6
    reports = [line for line in capfd.readouterr().err.splitlines() if "cannot be restored" in line]
    assert len(reports) == 1 and f"checkpoint {workdir}/checkpoints/6 cannot be restored (" in reports[0]
    steps = {n.split("/")[2] for n in gcs_emulator.objects(bucket, "run/checkpoints/")}
    aside = [s for s in steps if s.startswith("6.corrupt-")]
    assert len(aside) == 1 and aside[0] in reports[0]
    assert {s for s in steps if s.isdigit()} == {"2", "4", "6"}  # 6 written again by the resumed run
    resumed = {r["step"]: r["loss"] for r in map(json.loads, as_path(f"{workdir}/metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert [resumed[s] for s in range(1, 7)] == [train_losses(tmp_path)[s] for s in range(1, 7)]


def test_a_run_that_lost_its_lock_saves_no_further_checkpoint(gcs_emulator):
    from metatrain.errors import FaultError
    from metatrain.train.loop import Hook, Trainer

    from .conftest import tiny_config

    bucket = gcs_emulator.bucket()
    workdir = f"gs://{bucket}/run"
    config = tiny_config("trainer.steps=6", "checkpoint.every=2", "trainer.eval_every=0", "checkpoint.async_save=false")

    def lose_the_lock(info):
        if info.step == 2:  # as if another trainer had taken over the lock after a late heartbeat
            trainer.lock.lost = True

    trainer = Trainer(config, workdir, hooks=(Hook(every=1, fn=lose_the_lock),))
    try:
        with pytest.raises(FaultError, match=r"another trainer took over the lock of gs://.*stopping without saving step 4"):
            trainer.run()
    finally:
        trainer.close()
    steps = {n.split("/")[2] for n in gcs_emulator.objects(bucket, "run/checkpoints/")}
    assert steps == {"2"}
