"""A damaged checkpoint is moved aside and the next newest restores, with exact losses, in a
work directory on local disk and in a bucket (`store`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from metatrain.errors import FaultError
from metatrain.io.storage import as_path
from metatrain.run.reader import load_checkpoint
from metatrain.train.loop import train

from ..conftest import error_lines, run_cli, tiny_config, train_losses

STEPS = 6


def config(*overrides):
    return tiny_config(f"trainer.steps={STEPS}", "checkpoint.every=2", "trainer.eval_every=0", *overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, checkpoints at 2, 4 and 6."""
    workdir = tmp_path_factory.mktemp("reference")
    train(config(), workdir)
    return workdir


def _largest_state_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def truncate(step_dir: Path) -> None:
    path = _largest_state_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 3)


def zero(step_dir: Path) -> None:
    path = _largest_state_file(step_dir)
    path.write_bytes(bytes(path.stat().st_size))


def zero_every_array(step_dir: Path) -> None:
    for path in (step_dir / "state").rglob("d/*"):
        path.write_bytes(bytes(path.stat().st_size))


def garble_data_state(step_dir: Path) -> None:
    (step_dir / "data" / "metadata").write_text('{"format": "metatrain-data", "lanes": [')


@pytest.mark.parametrize("damage", [truncate, zero, garble_data_state], ids=lambda f: f.__name__)
def test_a_damaged_latest_checkpoint_falls_back_to_the_next_with_exact_losses(reference, tmp_path, damage, capfd):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    # Drop the records of steps 5 and 6: the resumed run must write the same ones again.
    records = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in records[:4]))
    checkpoints = run / "checkpoints"
    shutil.rmtree(checkpoints / "6")  # the run got to step 6, but step 6 is lost: resume wants 4
    damage(checkpoints / "4")
    capfd.readouterr()

    summary = train(config(), run)
    assert summary.start_step == 2 and summary.final_step == STEPS
    err = error_lines(capfd.readouterr().err)
    reports = [line for line in err if "cannot be restored" in line]
    assert len(reports) == 1 and f"checkpoint {checkpoints / '4'} cannot be restored (" in reports[0]
    aside = [p.name for p in checkpoints.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].startswith("4.corrupt-") and aside[0] in reports[0]
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [2, 4, 6]
    resumed, uninterrupted = train_losses(run), train_losses(reference)
    assert [resumed[s] for s in range(1, STEPS + 1)] == [uninterrupted[s] for s in range(1, STEPS + 1)]


def test_when_no_checkpoint_restores_the_run_stops_saying_so(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for step in (2, 4, 6):
        zero(run / "checkpoints" / str(step))
    done = run_cli("train", "--workdir", str(run))
    assert done.returncode == 74, done.stderr[-2000:]
    last = error_lines(done.stderr)[-1]
    assert last.startswith("metatrain train: fault: none of the 3 checkpoints") and "nothing to resume from" in last
    assert "Traceback" not in done.stderr
    names = sorted(p.name.split(".")[0] for p in (run / "checkpoints").iterdir())
    assert names == ["2", "4", "6"]  # moved aside, never deleted
    # Running again does not start a fresh run over the damaged one.
    again = run_cli("train", "--workdir", str(run))
    assert again.returncode == 74 and "holds only damaged checkpoints" in error_lines(again.stderr)[-1]
    assert not (run / "checkpoints" / "1").exists()


def test_generation_reads_through_the_same_path_and_leaves_the_directory_as_it_is(reference, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    zero_every_array(run / "checkpoints" / "6")  # the parameters too, not only the moments
    before = sorted(os.listdir(run / "checkpoints"))
    capfd.readouterr()
    loaded = load_checkpoint(workdir=run)
    assert loaded.step == 4
    assert "checkpoints/6 cannot be restored" in capfd.readouterr().err
    assert sorted(os.listdir(run / "checkpoints")) == before  # a reader moves nothing
    with pytest.raises(FaultError, match=r"checkpoints/6 cannot be restored"):
        load_checkpoint(checkpoint=run / "checkpoints" / "6")


def test_a_damaged_latest_checkpoint_in_a_store_is_moved_aside_and_the_next_restores(reference, store, capfd):
    workdir = f"{store}/run"
    train(config(), workdir)
    for name in store.files("run/checkpoints/6/state"):
        if "/d/" in f"/{name}":  # every array of step 6 zeroed
            path = as_path(f"{workdir}/checkpoints/6/state/{name}")
            path.write_bytes(bytes(len(path.read_bytes())))
    capfd.readouterr()
    summary = train(config(), workdir)
    assert summary.start_step == 4 and summary.final_step == 6
    reports = [line for line in capfd.readouterr().err.splitlines() if "cannot be restored" in line]
    assert len(reports) == 1 and f"checkpoint {workdir}/checkpoints/6 cannot be restored (" in reports[0]
    steps = {n.split("/")[0] for n in store.files("run/checkpoints")}
    aside = [s for s in steps if s.startswith("6.corrupt-")]
    assert len(aside) == 1 and aside[0] in reports[0]
    assert {s for s in steps if s.isdigit()} == {"2", "4", "6"}  # 6 written again by the resumed run
    resumed = train_losses(as_path(workdir))
    assert [resumed[s] for s in range(1, 7)] == [train_losses(reference)[s] for s in range(1, 7)]
