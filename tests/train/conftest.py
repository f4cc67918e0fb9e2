"""Shared helpers of the trainer tests: the tiny preset with a handful of steps, metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from metatrain.config import load_config
from metatrain.io.paths import REPO_ROOT

TINY = REPO_ROOT / "configs" / "tiny.yaml"
STEPS = 6


def tiny_config(*overrides: str):
    return load_config(
        TINY,
        [
            f"trainer.steps={STEPS}",
            "trainer.log_every=1",
            "trainer.eval_every=3",
            "trainer.eval_batches=1",
            "trainer.progress=false",
            "checkpoint.every=3",
            "checkpoint.async_save=true",
            *overrides,
        ],
    )


def read_records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def train_losses(workdir: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice (replayed after a resume) keeps its last value."""
    return {r["step"]: r["loss"] for r in read_records(workdir) if "loss" in r}


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`metatrain ARGS` in a fresh process on 2 CPU devices."""
    full = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    full.pop("METATRAIN_DEBUG", None)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "metatrain.cli", *args], env=full, capture_output=True, text=True, timeout=timeout
    )


def error_lines(stderr: str) -> list[str]:
    """stderr without the C++ runtime's start-up notices."""
    return [l for l in stderr.splitlines() if l.strip() and not l.startswith("WARNING: All log messages before absl")]
