"""Faults speak in one line, exit 74, and lose nothing: a full disk, a read-only work
directory, a damaged token cache. Disk faults use a real, small tmpfs (needs root, as CI
and the developer machines have)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from metatrain.errors import EXIT_STATUSES, FaultError
from metatrain.io.paths import REPO_ROOT
from metatrain.train.hooks import FunctionHook
from metatrain.train.loop import train

from ..conftest import TINY, error_lines, run_cli, tiny_config, train_losses


@pytest.fixture
def small_fs(tmp_path):
    """A fresh tmpfs; `mount(size)` mounts it, `remount_read_only()` freezes it."""
    mountpoint = tmp_path / "fs"
    mountpoint.mkdir()
    mounted = []

    class FS:
        path = mountpoint

        def mount(self, size: str) -> Path:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")
            mounted.append(mountpoint)
            return mountpoint

        def remount_read_only(self) -> None:
            subprocess.run(["mount", "-o", "remount,ro", str(mountpoint)], check=True)

    yield FS()
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)], check=False)


def _fill(directory: Path, leave_bytes: int) -> Path:
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    filler = directory / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        chunk = bytes(1 << 20)
        remaining = max(free - leave_bytes, 0)
        while remaining > 0:
            f.write(chunk[: min(len(chunk), remaining)])
            remaining -= len(chunk)
    return filler


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    train(tiny_config(), workdir)
    return workdir


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint_and_resumes_exactly(small_fs, reference):
    root = small_fs.mount("64m")
    workdir = root / "run"

    def fill_after_step_4(info):
        if info.step == 4:  # checkpoint 3 is saved; the one at 6 will not fit
            # The save of step 3 is asynchronous: under load it may still be writing, and
            # would take the space left for the metrics of steps 5 and 6.
            deadline = time.monotonic() + 120
            while not (workdir / "checkpoints" / "3").is_dir() and time.monotonic() < deadline:
                time.sleep(0.05)
            _fill(root, leave_bytes=256 << 10)

    with pytest.raises(FaultError) as fault:
        train(tiny_config(), workdir, hooks=(FunctionHook(every=1, fn=fill_after_step_4),))
    message = str(fault.value)
    assert "\n" not in message
    assert f"saving the checkpoint at step 6 in {workdir / 'checkpoints'} failed: No space left on device [ENOSPC]" in message
    assert "the last complete checkpoint (step 3) is kept" in message
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]

    (root / "filler").unlink()
    summary = train(tiny_config(), workdir)
    assert summary.start_step == 3 and summary.final_step == 6
    resumed, uninterrupted = train_losses(workdir), train_losses(reference)
    assert [resumed[s] for s in range(1, 7)] == [uninterrupted[s] for s in range(1, 7)]


def test_the_command_line_says_a_full_disk_in_one_line_and_exits_74(small_fs):
    root = small_fs.mount("2m")  # the lock and config fit; the first checkpoint does not
    args = ("train", "--config", str(TINY), "--workdir", str(root / "run"), "--set", "trainer.steps=2",
            "--set", "checkpoint.every=2", "--set", "trainer.eval_every=0", "--set", "trainer.progress=false")
    done = run_cli(*args)
    assert done.returncode == 74
    lines = error_lines(done.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("metatrain train: fault: saving the checkpoint at step 2") and "[ENOSPC]" in lines[0]
    shutil.rmtree(root / "run")  # the same disk again: what the first run left would fill it sooner
    debug = run_cli("--debug", *args)
    assert debug.returncode == 74 and "Traceback (most recent call last)" in debug.stderr
    noisy = error_lines(debug.stderr)
    assert lines[0] in noisy, [line for line in noisy if "metatrain train" in line]  # the same line, noise left in


def test_a_read_only_work_directory_is_one_line_and_changes_nothing(small_fs, reference):
    root = small_fs.mount("64m")
    shutil.copytree(reference, root / "run")
    before = {p: p.read_bytes() for p in (root / "run").rglob("*") if p.is_file()}
    small_fs.remount_read_only()
    done = run_cli("train", "--workdir", str(root / "run"), "--set", "trainer.steps=7")
    assert done.returncode == 74
    (line,) = error_lines(done.stderr)
    assert line == (f"metatrain train: fault: cannot write to the work directory {root / 'run'} (creating train.lock): "
                    f"Read-only file system [EROFS] ({root / 'run' / 'train.lock'}); give a writable --workdir")
    assert {p: p.read_bytes() for p in (root / "run").rglob("*") if p.is_file()} == before


def test_a_damaged_token_cache_chunk_is_a_one_line_fault(tmp_path):
    cache = tmp_path / "cache"
    built = run_cli("data", "cache", "--input", str(REPO_ROOT / "data" / "sample" / "factbook.jsonl"), "--out", str(cache),
                    "--tokenizer", str(REPO_ROOT / "tokenizer" / "sample.model"))
    assert built.returncode == 0, built.stderr[-2000:]
    for chunk in (cache / "ids").iterdir():
        if chunk.is_file() and chunk.name != ".zarray":
            chunk.write_bytes(b"not a chunk")
    done = run_cli("train", "--config", str(TINY), "--workdir", str(tmp_path / "run"), "--set", "trainer.steps=2",
                   "--set", f"data.sources=[{{path: {cache}}}]", "--set", "trainer.eval_every=0")
    assert done.returncode == 74, done.stderr[-2000:]
    (line,) = error_lines(done.stderr)
    assert line.startswith(f"metatrain train: fault: token cache {cache}, document ") and "rebuild the cache" in line


def test_the_readme_documents_every_exit_status():
    readme = (REPO_ROOT / "README.md").read_text()
    for code, meaning in EXIT_STATUSES.items():
        assert f"| {code} | {meaning} |" in readme
