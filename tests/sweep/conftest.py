"""Shared helpers of the sweep tests: specs, and the metrics a sweep's runs leave (for a sweep
directory on local disk or in a bucket)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from metatrain.io.storage import as_path
from metatrain.sweep.law import Law

from ..conftest import TINY

#: 3 sizes x 2 token budgets of the tiny preset, evaluated every 2 steps.
GRID_SPEC = f"""\
base: {TINY}
overrides: {{trainer.eval_every: 2}}
grid:
  sizes: [tiny-1, tiny-2, tiny-3]
  tokens: [2048, 4096]
"""

#: The law the losses `write_metrics` writes are drawn from.
LAW = Law(E=1.8, A=400.0, B=400.0, alpha=0.34, beta=0.28)


def write_spec(tmp_path: Path, body: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"base: {TINY}\n" + textwrap.dedent(body))
    return path


@pytest.fixture
def grid_spec(tmp_path) -> Path:
    """`GRID_SPEC` as a file."""
    path = tmp_path / "sweep.yaml"
    path.write_text(GRID_SPEC)
    return path


def write_metrics(directory, record, last=None):
    """metrics.jsonl as the trainer writes it into the run of `record` in the sweep `directory`
    (local or gs://), up to step `last` (default: the run's last step): evaluations at step 2
    and the last, with the losses of `LAW`."""
    last = record["steps"] if last is None else last
    lines = [{"step": 1, "loss": 9.0}]
    for step in sorted({min(2, last), last}):
        loss = LAW(record["params"], record["tokens"] * step / record["steps"])
        lines.append({"step": step, "eval/loss": loss + 0.1, "eval/loss/text": loss, "eval/loss/thinking": loss + 0.4,
                      "eval/bpb/text": loss / 4})
    (as_path(directory) / record["workdir"] / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
