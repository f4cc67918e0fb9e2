"""Helpers for the launch tests: tiny runs, their metrics, and processes that cannot hang.

Every process a test starts is a `Started` with its output in a file (no pipe to fill)
and is killed when the test ends, whatever happened; every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import pytest

from metatrain.io.paths import REPO_ROOT

from ..conftest import TINY

#: Long enough for a test's step or compile on the shared 2-core machine, short enough to fail.
RUN_TIMEOUT_S = 240


def tiny_overrides(steps: int, every: int = 4) -> list[str]:
    """Config overrides of the tiny runs: `steps` steps, a loss line per step, no evaluation."""
    return [
        f"trainer.steps={steps}",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.progress=false",
        f"checkpoint.every={every}",
    ]


def tiny_train_args(workdir: Path, steps: int, every: int = 4) -> list[str]:
    """`train ...` for the tiny preset with `tiny_overrides`."""
    sets = tiny_overrides(steps, every)
    return ["train", "--config", str(TINY), "--workdir", str(workdir), *[w for s in sets for w in ("--set", s)]]


def train_losses(workdir: Path) -> dict[int, float]:
    """Step -> loss from a run's metrics.jsonl (a resumed run appends to it)."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def complete_checkpoints(workdir: Path) -> list[int]:
    """Steps of the finalised checkpoints (orbax renames a step's directory when it is complete)."""
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


class Started:
    """A `python -m metatrain.cli ...` process with its output captured in a file."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str]):
        self.log = log
        self._file = open(log, "wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "metatrain.cli", *args],
            cwd=REPO_ROOT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"timed out after {timeout} s; output:\n{self.output[-4000:]}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(30)
        self._file.close()


def wait_until(condition: Callable[[], bool], what: str, started: Started, timeout: float = RUN_TIMEOUT_S) -> None:
    """Poll `condition`; fail (with the process's output) if it exits or time runs out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if started.popen.poll() is not None:
            pytest.fail(f"exited ({started.popen.returncode}) before {what}; output:\n{started.output[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {what} within {timeout} s; output:\n{started.output[-4000:]}")


def launched_pids(output: str) -> dict[int, int]:
    """Process index -> pid, from the launcher's `[launch] process N: pid P` lines."""
    return {int(i): int(p) for i, p in re.findall(r"\[launch\] process (\d+): pid (\d+)", output)}


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory) -> Path:
    """JAX's persistent compilation cache, shared by the processes of this test session.

    Runs of one config and layout (a run and its resume) compile the same programs; the
    second loads them instead of compiling again (`train_step` takes seconds on 2 cores).
    """
    return tmp_path_factory.mktemp("jax-compilation-cache")


@pytest.fixture
def start(tmp_path, compilation_cache):
    """`start(args, name, env=None) -> Started`; every started process is killed at the end."""
    started: list[Started] = []
    cache_env = {
        "JAX_COMPILATION_CACHE_DIR": str(compilation_cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }

    def _start(args: Sequence[str], name: str, env: dict[str, str] | None = None) -> Started:
        proc = Started(args, tmp_path / f"{name}.log", {**cache_env, **(env or {})})
        started.append(proc)
        return proc

    yield _start
    for proc in started:
        proc.kill()
