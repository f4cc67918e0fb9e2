"""Shared fixtures: a small synthetic corpus and a tokenizer trained on it (once per session),
and the same files in a store (local disk, or a bucket)."""

from __future__ import annotations

import random

import pytest

from metatrain.io.paths import DEFAULT_TAGS
from metatrain.tokenizer import Encoder, Grammar, SpmTokenizer, load_registry, train_tokenizer

from ..conftest import WORDS, write_jsonl

#: Vocabulary size of the test tokenizer: prime, above the 267 pieces that bytes, specials and tags take.
TEST_VOCAB = 331


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 18))]
    text = " ".join(words).capitalize() + rng.choice([".", ",", "!", "?", ": 23%.", " (1998)."])
    return text


def make_corpus(n_docs: int, seed: int = 0) -> list[dict]:
    """Documents with paragraphs, thinking blocks, mode changes and controls."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        segments = []
        for _ in range(rng.randint(1, 5)):
            paragraph = "\n".join(" ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))
                                  for _ in range(rng.randint(1, 3)))
            segments.append({"kind": "text", "text": paragraph + "\n\n"})
            if rng.random() < 0.7:
                segments.append({"kind": "thinking", "text": _sentence(rng) + " " + _sentence(rng)})
        doc = {"id": f"doc-{d}", "segments": segments}
        if d % 5 == 1:
            doc["mode"] = "ai"
        docs.append(doc)
    return docs


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    write_jsonl(path, make_corpus(300))
    return path


@pytest.fixture(scope="session")
def registry():
    return load_registry()


@pytest.fixture(scope="session")
def grammar(registry):
    return Grammar(registry)


@pytest.fixture(scope="session")
def model_path(corpus_path, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tok") / "test"
    return train_tokenizer([corpus_path], vocab_size=TEST_VOCAB, out_prefix=prefix).model_path


@pytest.fixture(scope="session")
def tokenizer(model_path, registry):
    return SpmTokenizer.load(model_path, registry)


@pytest.fixture(scope="session")
def encoder(tokenizer, grammar):
    return Encoder(tokenizer, grammar)


@pytest.fixture
def stored_inputs(store, model_path, corpus_path):
    """`store` holding the test tokenizer, the shipped tags and the corpus (whole, and in two shards)."""
    store.upload("tok.model", model_path)
    store.upload("tags.yaml", DEFAULT_TAGS)
    store.upload("docs.jsonl", corpus_path)
    lines = corpus_path.read_bytes().splitlines(keepends=True)
    store.write_bytes("shards/a.jsonl", b"".join(lines[:120]))
    store.write_bytes("shards/b.jsonl", b"".join(lines[120:]))
    return store
