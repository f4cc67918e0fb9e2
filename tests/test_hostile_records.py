"""Hostile and unusual input files, through both read paths and the `encode` command.

Pathological records (nesting a million levels deep, 100,000-digit numbers, 1e400, a
10 MB key) are record errors, skipped and counted with file and line; compressed
corpora are read by the commands (the reading itself: tests/io/test_compression.py); a
leading byte order mark keeps its document; JSON errors say "at column" once.
"""

from __future__ import annotations

import gzip
import json

import pytest
import zstandard

from metatrain import cli as metatrain_cli
from metatrain.data.sources import EncoderSpec, JsonlLines, JsonlReader, SkipLog, expand_jsonl_paths
from metatrain.documents import SkipCounter, read_documents
from metatrain.errors import UserError
from metatrain.io.formats import RecordError
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_TOKENIZER
from metatrain.io.strict_parsing import MAX_JSON_DEPTH, MAX_JSON_KEY_LENGTH

from .conftest import good_record, line_records, write_lines

pytestmark = pytest.mark.hostile

SPEC = EncoderSpec(str(SAMPLE_TOKENIZER), str(DEFAULT_TAGS), None, "every")
SEGMENTS = '"segments": [{"kind": "text", "text": "The river floods in spring."}]'


def _with_meta(doc_id: str, meta: str) -> bytes:
    return f'{{"id": "{doc_id}", "meta": {meta}, {SEGMENTS}}}'.encode()


# (name, record line, what the reason says)
HOSTILE = [
    ("objects-3000-deep", _with_meta("deep", '{"a": ' * 3000 + "1" + "}" * 3000), f"nested deeper than {MAX_JSON_DEPTH} levels"),
    ("arrays-1e6-deep", _with_meta("deeper", "[" * 10**6 + "]" * 10**6), f"nested deeper than {MAX_JSON_DEPTH} levels"),
    ("depth-limit-plus-one", _with_meta("d65", "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH),
     f"nested deeper than {MAX_JSON_DEPTH} levels"),
    ("int-100000-digits", _with_meta("bigint", "9" * 100_000), "number too large: 100000 characters"),
    ("float-1e400", _with_meta("inf", "1e400"), "number too large: 1e400 does not fit"),
    ("float-minus-1e400", _with_meta("minf", "-1e400"), "number too large: -1e400"),
    ("nan", _with_meta("nan", "NaN"), "NaN is not a JSON number"),
    ("key-10-mb", f'{{"id": "key", "{"k" * 10_000_000}": 1, {SEGMENTS}}}'.encode(),
     f"key longer than {MAX_JSON_KEY_LENGTH} characters (10000000 characters"),
]
HOSTILE_IDS = [name for name, _, _ in HOSTILE]


def test_the_depth_limit_itself_and_brackets_inside_strings_are_fine(tmp_path):
    path = tmp_path / "docs.jsonl"
    # the document is the outermost level, `meta` adds the rest: MAX_JSON_DEPTH in all
    at_limit = _with_meta("d64", "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1))
    brackets_in_text = json.dumps({"id": "text", "segments": [{"kind": "text", "text": "[{" * 5000}]}).encode()
    over_limit = _with_meta("d65", "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    write_lines(path, [at_limit, brackets_in_text, over_limit])
    skips = SkipCounter()
    assert [d.id for d in read_documents(path, skips=skips)] == ["d64", "text"]
    assert skips.messages == [f"{path}:3: nested deeper than {MAX_JSON_DEPTH} levels (a document needs 3; "
                              "flatten the metadata)"]


@pytest.mark.parametrize("name, record, reason", HOSTILE, ids=HOSTILE_IDS)
def test_read_documents_skips_a_hostile_record_and_keeps_its_neighbours(tmp_path, name, record, reason):
    path = tmp_path / "docs.jsonl"
    write_lines(path, [good_record(0), record, good_record(1)])
    skips = SkipCounter()
    docs = list(read_documents(path, skips=skips))
    assert [(d.id, d.line) for d in docs] == [("ok-0", 1), ("ok-1", 3)]
    assert skips.count == 1
    (message,) = skips.messages
    assert message.startswith(f"{path}:2: ") and reason in message
    assert len(message) < 300  # a 10 MB key or 100,000 digits are not quoted whole
    with pytest.raises(RecordError, match=f"{path}:2: .*{reason[:20]}"):
        list(read_documents(path, strict=True))


@pytest.mark.parametrize("name, record, reason", HOSTILE, ids=HOSTILE_IDS)
def test_jsonl_reader_skips_a_hostile_record_and_keeps_its_neighbours(tmp_path, name, record, reason):
    path = tmp_path / "docs.jsonl"
    write_lines(path, [good_record(0), record, good_record(1)])
    log = SkipLog()
    reader = JsonlReader(SPEC, split=None, eval_fraction=0.0, strict=False, skips=log)
    out = [reader.encode_record(r) for r in line_records(JsonlLines([path]))]
    assert [o is not None for o in out] == [True, False, True]
    (skipped,) = log.drain()
    assert (skipped.path, skipped.line) == (str(path), 2) and reason in skipped.reason
    strict = JsonlReader(SPEC, split=None, eval_fraction=0.0, strict=True, skips=SkipLog())
    with pytest.raises(UserError, match=f"{path}:2: .*{reason[:20]}"):
        strict.encode_record(JsonlLines([path])[1])


def test_json_errors_say_at_column_once(tmp_path):
    path = tmp_path / "docs.jsonl"
    write_lines(path, [b'{"id": "x", "segments": [{"kind": "text", "text": "never closed}]}', good_record(0)])
    skips = SkipCounter()
    assert [d.id for d in read_documents(path, skips=skips)] == ["ok-0"]
    assert skips.messages == [f"{path}:1: invalid JSON: Unterminated string starting at column 51"]
    log = SkipLog()
    JsonlReader(SPEC, split=None, eval_fraction=0.0, strict=False, skips=log).encode_record(JsonlLines([path])[0])
    assert next(iter(log.drain())).reason == "invalid JSON: Unterminated string starting at column 51"


def test_a_leading_byte_order_mark_keeps_the_first_document(tmp_path):
    path = tmp_path / "docs.jsonl"
    write_lines(path, [b"\xef\xbb\xbf" + good_record(0), good_record(1)])
    skips = SkipCounter()
    assert [d.id for d in read_documents(path, skips=skips, strict=True)] == ["ok-0", "ok-1"]
    reader = JsonlReader(SPEC, split=None, eval_fraction=0.0, strict=True, skips=SkipLog())
    encoded = [reader.encode_record(r) for r in line_records(JsonlLines([path]))]
    assert [e.doc_id for e in encoded] == ["ok-0", "ok-1"]


def test_a_directory_source_is_named_a_directory(tmp_path):
    (tmp_path / "shards").mkdir()
    with pytest.raises(UserError, match=r"shards is a directory.*give a glob such as .*shards/\*\.jsonl"):
        expand_jsonl_paths(tmp_path / "shards")


def test_encode_reads_a_compressed_corpus_and_skips_hostile_records(tmp_path, capsys):
    path = tmp_path / "docs.jsonl.gz"
    lines = [b"\xef\xbb\xbf" + good_record(0)]
    for i, (_, record, _) in enumerate(HOSTILE[:-1], start=1):  # the 10 MB key is covered above
        lines += [record, good_record(i)]
    write_lines(path, lines, gzip.open)
    out = tmp_path / "encoded.jsonl"
    argv = ["encode", "--tokenizer", str(SAMPLE_TOKENIZER), "--input", str(path), "--output", str(out)]
    assert metatrain_cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"skipped {len(HOSTILE) - 1} bad records" in err
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [f"ok-{i}" for i in range(len(HOSTILE))]


def test_tokenizer_train_reads_a_zstd_corpus(tmp_path):
    from metatrain.tokenizer import load_registry, train_tokenizer

    path = tmp_path / "docs.jsonl.zst"
    write_lines(path, [good_record(i) for i in range(50)], zstandard.open)
    report = train_tokenizer([path], vocab_size=300, out_prefix=tmp_path / "tok", registry=load_registry())
    assert report.documents == 50


def test_data_cache_reads_a_compressed_corpus(tmp_path, capsys):
    path = tmp_path / "docs.jsonl.gz"
    write_lines(path, [good_record(0), HOSTILE[0][1], good_record(1)], gzip.open)
    out = tmp_path / "cache"
    argv = ["data", "cache", "--input", str(tmp_path / "*.jsonl"), "--tokenizer", str(SAMPLE_TOKENIZER),
            "--out", str(out), "--no-progress"]
    assert metatrain_cli.main(argv) == 0
    meta = json.loads((out / "cache.json").read_text())
    assert (meta["documents"], meta["skipped_records"]) == (2, 1)
