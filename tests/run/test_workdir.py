"""What a work directory is: runs created from another config file, and what may be
trained in (a new or empty directory, or a run's own)."""

from __future__ import annotations

import json

import pytest

from metatrain.train.loop import train

from ..conftest import TINY, error_lines, run_cli, tiny_config


def test_a_workdir_created_from_another_config_file_is_refused_unless_allowed(tmp_path):
    a, b = tmp_path / "a" / "tiny.yaml", tmp_path / "b" / "tiny.yaml"
    for path in (a, b):
        path.parent.mkdir()
        path.write_text(f"base: {TINY}\n")
    workdir = tmp_path / "run"
    common = ["--workdir", str(workdir), "--set", "trainer.eval_every=0", "--set", "trainer.progress=false"]
    first = run_cli("train", "--config", str(a), *common, "--set", "trainer.steps=1")
    assert first.returncode == 0, first.stderr[-2000:]
    config_before = (workdir / "config.yaml").read_bytes()

    other = run_cli("train", "--config", str(b), *common, "--set", "trainer.steps=2")
    assert other.returncode == 2
    (line,) = error_lines(other.stderr)
    assert f"was created from {a}, not {b}" in line and "--allow-other-config" in line
    assert (workdir / "config.yaml").read_bytes() == config_before

    # The plain resume (no --config) and the same file still work; the flag adopts the other.
    again = run_cli("train", *common, "--set", "trainer.steps=2")
    assert again.returncode == 0 and "trained steps 1 -> 2" in again.stdout, again.stderr[-2000:]
    adopted = run_cli("train", "--config", str(b), *common, "--set", "trainer.steps=3", "--allow-other-config")
    assert adopted.returncode == 0 and "trained steps 2 -> 3" in adopted.stdout, adopted.stderr[-2000:]
    assert json.loads((workdir / "run.json").read_text())["config_file"] == str(b)


_QUICK = ("--config", str(TINY), "--set", "trainer.steps=1", "--set", "trainer.eval_every=0",
          "--set", "trainer.progress=false")


@pytest.mark.hostile
def test_a_regular_file_as_workdir_is_a_user_error_in_one_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine\n")
    done = run_cli("train", "--workdir", str(path), *_QUICK)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = error_lines(done.stderr)
    assert f"--workdir {path} is a file, not a directory" in line
    assert path.read_text() == "mine\n"


@pytest.mark.hostile
def test_a_directory_that_is_not_a_run_is_refused_naming_what_is_missing(tmp_path):
    # What a SIGTERM left of an `import`: the run's files, but no config.yaml and no checkpoints.
    half = tmp_path / "imported"
    half.mkdir()
    (half / "tokenizer.model").write_bytes(b"half")
    (half / "tags.yaml").write_text("tags: []\n")
    before = sorted(p.name for p in half.iterdir())
    done = run_cli("train", "--workdir", str(half), *_QUICK)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = error_lines(done.stderr)
    assert f"--workdir {half} is not empty and is not a run" in line
    assert "no config.yaml and no checkpoints/" in line and "tags.yaml, tokenizer.model" in line
    assert "new or empty directory" in line
    assert sorted(p.name for p in half.iterdir()) == before  # nothing written, nothing trained


def test_an_empty_directory_still_starts_a_fresh_run(tmp_path):
    summary = train(tiny_config("trainer.steps=1", "trainer.eval_every=0"), tmp_path)  # absent: everywhere else
    assert summary.final_step == 1 and (tmp_path / "config.yaml").is_file()


@pytest.mark.hostile
def test_a_workdir_inside_another_runs_checkpoints_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    inside = run / "checkpoints" / "555"
    done = run_cli("train", "--workdir", str(inside), *_QUICK)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = error_lines(done.stderr)
    assert f"--workdir {inside} is inside {run / 'checkpoints'}" in line
    assert not inside.exists()
