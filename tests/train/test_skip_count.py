"""The train summary's count of bad records agrees with the warnings in its log: each bad
record is counted and logged once, however many epochs, evaluations and streams read it."""

from __future__ import annotations

import logging
import re

import pytest

from metatrain.config import load_config
from metatrain.io.paths import CONFIGS_DIR, SAMPLE_CORPUS
from metatrain.train.loop import format_summary, train

pytestmark = pytest.mark.hostile

BAD = ['not json', '{"id": "x", "segments": [{"kind": "poem", "text": "a"}]}', '[1, 2]']


def test_summary_count_equals_the_distinct_bad_records_logged(tmp_path, caplog):
    lines = SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()[:12]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join([*lines[:4], BAD[0], *lines[4:8], BAD[1], *lines[8:], BAD[2]]) + "\n")
    config = load_config(CONFIGS_DIR / "tiny.yaml", [
        f"data.sources=[{{path: {corpus}}}]", "data.eval_fraction=0.3",
        "trainer.steps=12", "trainer.batch_size=8", "trainer.seq_len=64", "trainer.log_every=4",
        "trainer.eval_every=4", "trainer.eval_batches=1", "trainer.progress=false",
        "checkpoint.every=100", "checkpoint.async_save=false",
    ])
    with caplog.at_level(logging.WARNING, logger="metatrain"):
        summary = train(config, tmp_path / "run")
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping bad record")]
    where = [re.search(r"corpus\.jsonl:(\d+)", m).group(1) for m in logged]
    assert len(where) == len(set(where)), f"a record was logged twice: {logged}"
    assert sorted(where, key=int) == ["5", "10", "15"]  # a dozen documents: every epoch reads all three
    assert summary.skipped_records == 3
    assert "skipped 3 invalid records" in format_summary(summary)
