"""Shared fixtures for the data pipeline tests: the sample tokenizer's encoder, the same corpus
on local disk and in a bucket, texts that trip tokenizers (the corpora, `data_config` and the
batch helpers are in tests/conftest.py)."""

from __future__ import annotations

import gzip
import json

import pytest
import zstandard

from ..conftest import STORES, documents_parquet, make_docs, open_store, write_array_record


#: Texts that trip tokenizers: literal tags, SentencePiece's own `▁`, emoji, whitespace runs.
TRICKY_TEXTS = (
    "literal tags: <thinking>x</thinking> <AI>hi</AI> <|good|><|bad|> <AI_quoting_human>",
    "special-looking: <s> </s> <unk> <pad> <0x41>",
    "meta space ▁ alone, ▁▁ doubled, and▁glued",
    "emoji 🙂👍🏽 naïve café 日本語 e\u0301",
    "  leading\ttab\t\truns   of   spaces\n\n\nnewlines\r\nCRLF   ",
    " ",
    "",
)


@pytest.fixture(scope="session")
def encoder(encoder_spec):
    return encoder_spec.build()


def _jsonl_bytes(records: list, *, crlf: bool = False, final_newline: bool = True) -> bytes:
    end = "\r\n" if crlf else "\n"
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    return (end.join(lines) + (end if final_newline else "")).encode("utf-8")


@pytest.fixture(scope="module", params=STORES)
def stored_corpus(request, tmp_path_factory):
    """The same files on local disk and in a store (local disk, or a bucket):
    `(docs, local root, store)`; the store's copies are under `corpus/`."""
    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs(40, seed=5)
    files = {
        # blank lines, a line of only "\r", a bad line and no final newline: every case of the line index
        "plain.jsonl": _jsonl_bytes([docs[0], "", docs[1], "\r", "{broken", *docs[2:10]], final_newline=False),
        "shards/a.jsonl": _jsonl_bytes(docs[10:18], crlf=True),
        "shards/b.jsonl.gz": gzip.compress(_jsonl_bytes(["", *docs[18:26]])),
        "shards/c.jsonl.zst": zstandard.ZstdCompressor().compress(_jsonl_bytes(docs[26:32])),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    documents_parquet(root / "corpus.parquet", docs[:23], row_group_size=4)
    write_array_record(root / "corpus.array_record", docs[:17])
    store = open_store(request.param, request, tmp_path_factory.mktemp("store"))
    for name in [*files, "corpus.parquet", "corpus.array_record"]:
        store.upload(f"corpus/{name}", root / name)
    return docs, root, store
