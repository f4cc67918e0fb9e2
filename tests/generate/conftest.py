"""Fixtures of the generation tests: the shipped encoder, a tiny trained checkpoint."""

from pathlib import Path

import pytest

from metatrain.config import load_config
from metatrain.paths import CONFIGS_DIR, DEFAULT_TAGS, SAMPLE_TOKENIZER
from metatrain.tokenizer.encoder import Encoder


@pytest.fixture(scope="session")
def encoder() -> Encoder:
    """The sample tokenizer with the shipped tags and mantra (policy `every`)."""
    return Encoder.from_files(SAMPLE_TOKENIZER, DEFAULT_TAGS)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """A work directory with one checkpoint, written by the real trainer (tiny model, 1 step)."""
    from metatrain.train.loop import train

    path = tmp_path_factory.mktemp("run")
    config = load_config(CONFIGS_DIR / "tiny.yaml", [
        "trainer.steps=1", "trainer.batch_size=8", "trainer.seq_len=32", "trainer.eval_every=0",
        "trainer.progress=false", "checkpoint.every=1", "checkpoint.async_save=false",
    ])
    train(config, path)
    return path
