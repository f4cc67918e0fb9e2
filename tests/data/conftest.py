"""Shared fixtures for the data pipeline tests: small corpora on disk, encoded with the sample tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from metatrain.data.config import DataConfig, SourceConfig
from metatrain.data.sources import EncoderSpec
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_TOKENIZER

_WORDS = (
    "the of and to in a is that for it as was with be by on not this are from at which have "
    "study found reduction symptoms after weeks treatment however placebo group showed improvement "
    "population country capital river climate exports percent million border coast mountains"
).split()


def make_docs(n: int, *, prefix: str = "doc", first_word: str | None = None, seed: int = 0) -> list[dict]:
    """`n` documents with text and thinking segments of varied length and unique ids.

    `first_word`, when given, opens every document (so tests can tell sources apart).
    """
    rng = random.Random(seed)
    docs = []
    for d in range(n):
        segments = []
        for s in range(rng.randint(1, 4)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 40))]
            if s == 0 and first_word is not None:
                words[0] = first_word
            segments.append({"kind": "text", "text": " ".join(words) + ". "})
            if rng.random() < 0.6:
                segments.append({"kind": "thinking", "text": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 25)))})
        docs.append({"id": f"{prefix}-{d}", "segments": segments})
    return docs


def write_jsonl(path: Path, records: list) -> Path:
    """Writes one line per record: dicts as JSON, strings verbatim (for bad lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def encoder_spec() -> EncoderSpec:
    return EncoderSpec(str(SAMPLE_TOKENIZER), str(DEFAULT_TAGS), None, "every")


@pytest.fixture(scope="session")
def encoder(encoder_spec):
    return encoder_spec.build()


def data_config(*paths: Path, weights: tuple[float, ...] | None = None, **kwargs) -> DataConfig:
    """A DataConfig over `paths` with the sample tokenizer."""
    weights = weights or (1.0,) * len(paths)
    sources = tuple(SourceConfig(p, w) for p, w in zip(paths, weights))
    return DataConfig(sources=sources, tokenizer=SAMPLE_TOKENIZER, tags=DEFAULT_TAGS, **kwargs)


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), f"batch {i} field {k} differs"
