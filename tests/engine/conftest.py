"""Fixtures of the engine tests: the shipped encoder (the tiny trained run, `workdir`, is in
tests/conftest.py)."""

import pytest

from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_TOKENIZER
from metatrain.tokenizer.encoder import Encoder


@pytest.fixture(scope="session")
def encoder() -> Encoder:
    """The sample tokenizer with the shipped tags and mantra (policy `every`)."""
    return Encoder.from_files(SAMPLE_TOKENIZER, DEFAULT_TAGS)
