"""Shared helpers of the generations tests: a known-answer corpus and tiny loop specs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ..conftest import TINY

#: The tiny preset made tinier: a handful of steps on short rows, checkpoints every 2.
TRAIN_SET = [
    "trainer.steps=4", "trainer.batch_size=4", "trainer.seq_len=64", "trainer.eval_every=2",
    "trainer.eval_batches=1", "trainer.progress=false", "checkpoint.every=2", "checkpoint.async_save=false",
]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A small `chain` known-answer corpus (`metatrain data synthetic`): train, train_raw, heldout, heldout_raw."""
    from metatrain.cli import main

    out = tmp_path_factory.mktemp("synthetic") / "chain.jsonl"
    assert main(["data", "synthetic", "--task", "chain", "--documents", "16", "--heldout", "8", "--out", str(out)]) == 0
    files = {"train": out, "train_raw": out.with_name("chain.raw.jsonl"),
             "heldout": out.with_name("chain.heldout.jsonl"), "heldout_raw": out.with_name("chain.heldout.raw.jsonl")}
    assert all(p.is_file() for p in files.values())
    return files


def spec_data(corpus: dict[str, Path], generations: int = 1, **sections) -> dict:
    """A loop spec: gen 0 copies the teacher's corpus, the tiny preset trains a few steps,
    eval is cheap; `sections` replace or add top-level keys."""
    data = {
        "corpus": [str(corpus["train_raw"])],
        "heldout": [str(corpus["heldout"])],
        "generations": generations,
        "annotate": {"max_blocks": 2, "max_tokens": 8, "seed": 0},
        "generation0": {"corpus": str(corpus["train"])},
        "train": {"config": str(TINY), "set": list(TRAIN_SET), "continue": False},
        "eval": {"max_documents": 8, "args": ["--no-generation", "--no-probes", "--bootstrap", "20"]},
    }
    data.update(sections)
    return data


def write_spec(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def child_env() -> dict[str, str]:
    """The environment of a loop (and so of its stages): CPU, one device, no debug, no test hook."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    for name in ("METATRAIN_DEBUG", "METATRAIN_GENERATIONS_STOP_AT"):
        env.pop(name, None)
    return env


def run_loop(spec: Path, out: Path, *args: str, stop_at: str | None = None, timeout: int = 900):
    """`metatrain generations run SPEC --out OUT` in a fresh process; the CompletedProcess."""
    env = child_env()
    if stop_at:
        env["METATRAIN_GENERATIONS_STOP_AT"] = stop_at
    return subprocess.run([sys.executable, "-m", "metatrain.cli", "generations", "run", str(spec), "--out", str(out),
                           *args], env=env, capture_output=True, text=True, timeout=timeout)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())
