"""`metatrain launch local -- annotate --generator metatrain ...`: one model sharded over the
devices of two processes writes the corpus one process writes.

Each process runs the annotation, its engine on its share of the mesh; process 0 decides
each engine call and broadcasts it (`Engine._serve_together`), so both step the same
rows although replies reach their event loops at different moments. Process 0 alone
writes the output."""

from __future__ import annotations

import json

import pytest

from ..annotate.test_annotate import write_raw

ARGS = ["--generator", "metatrain", "--max-tokens", "12", "--min-chars", "1", "--no-progress", "--concurrency", "3"]


def _segments(path) -> list[str]:
    return [json.dumps(json.loads(line)["segments"]) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow  # about a minute on 2 cores
def test_two_processes_write_the_corpus_of_one_process(workdir, start, tmp_path):
    raw = write_raw(tmp_path / "raw.jsonl")
    two, one = tmp_path / "two.jsonl", tmp_path / "one.jsonl"
    launched = start(["launch", "local", "--processes", "2", "--devices-per-process", "4", "--",
                      "annotate", "--input", str(raw), "--out", str(two), "--workdir", str(workdir), *ARGS], "launch")
    assert launched.wait() == 0, launched.output[-4000:]
    single = start(["annotate", "--input", str(raw), "--out", str(one), "--workdir", str(workdir), *ARGS], "one",
                   env={"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert single.wait() == 0, single.output[-4000:]
    assert _segments(two) == _segments(one)
    assert len(_segments(two)) == 3
    assert "[launch] all 2 processes finished" in launched.output
