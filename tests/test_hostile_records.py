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
from metatrain.data.config import DataConfig
from metatrain.data.sources import EncoderSpec, JsonlLines, JsonlReader, SkipLog, expand_jsonl_paths
from metatrain.documents import SkipCounter, read_documents
from metatrain.errors import UserError
from metatrain.io.compression import MAX_LINE_BYTES, SKIP_FACTOR
from metatrain.io.formats import RecordError
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_TOKENIZER
from metatrain.io.strict_parsing import MAX_JSON_DEPTH, MAX_JSON_KEY_LENGTH

from .conftest import data_config, error_lines, good_record, line_records, run_cli, write_lines

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


# -- over-long lines and files without line ends (issue 25) ---------------------------------


def test_encode_of_dev_zero_ends_in_one_line_without_holding_it(tmp_path):
    out = tmp_path / "encoded.jsonl"
    # the default bound (MAX_LINE_BYTES): /dev/zero is read a bounded amount, never held whole
    result = run_cli("encode", "--tokenizer", str(SAMPLE_TOKENIZER), "--input", "/dev/zero",
                     "--output", str(out), timeout=120)
    lines = error_lines(result.stderr)
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines[-1].startswith("metatrain encode: error: no valid document in /dev/zero, so nothing was "
                                "written to ")
    assert f"/dev/zero:1: no line end within {(SKIP_FACTOR + 1) * MAX_LINE_BYTES} bytes" in lines[-1]
    assert "is it a JSON Lines file?" in lines[-1] and not out.exists()


def test_a_line_past_the_default_bound_is_skipped_by_both_read_paths(tmp_path):
    path = tmp_path / "docs.jsonl"
    huge = b'{"id": "huge", "segments": [{"kind": "text", "text": "' + b"x" * MAX_LINE_BYTES + b'"}]}'
    write_lines(path, [good_record(0), huge, good_record(1)])
    skips = SkipCounter()
    assert [d.id for d in read_documents(path, skips=skips)] == ["ok-0", "ok-1"]
    assert skips.messages[0].startswith(f"{path}:2: the line is {len(huge)} bytes, longer than the "
                                        f"limit of {MAX_LINE_BYTES} bytes")
    log = SkipLog()
    reader = JsonlReader(SPEC, split=None, eval_fraction=0.0, strict=False, skips=log)
    assert [reader.encode_record(r) is not None for r in line_records(JsonlLines([path]))] == [True, False, True]
    assert next(iter(log.drain())).reason == skips.messages[0].split(": ", 1)[1]


def test_training_data_takes_the_bound_from_the_data_config(tmp_path):
    from metatrain.data import make_batch_iterator

    path = tmp_path / "docs.jsonl"
    write_lines(path, [good_record(i) for i in range(20)] + [b"x" * 3000])
    data = data_config(path, eval_fraction=0.0, max_line_bytes=1000)
    with make_batch_iterator(data, batch_size=2, seq_len=16) as batches:
        for _ in range(12):  # past a whole pass over the data
            next(batches)
    assert batches.skips.count == 1
    assert batches.skips.messages[0].startswith(f"{path}:21: the line is 3000 bytes, longer than the limit of "
                                                "1000 bytes")


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "64MiB"])
def test_the_bound_in_the_data_config_is_checked(value):
    with pytest.raises(ValueError, match=f"`max_line_bytes` must be an integer >= 1 .*got {value!r}"):
        DataConfig(max_line_bytes=value)


def test_data_cache_of_dev_zero_is_named_as_not_a_regular_file(tmp_path):
    result = run_cli("data", "cache", "--input", "/dev/zero", "--tokenizer", str(SAMPLE_TOKENIZER),
                     "--out", str(tmp_path / "cache"), "--no-progress", timeout=120)
    assert result.returncode == 2
    assert error_lines(result.stderr)[-1].startswith("metatrain data: error: data source /dev/zero is not a regular "
                                                     "file")


@pytest.mark.parametrize("command", ["encode", "data cache", "tokenizer train"])
def test_every_command_that_reads_json_lines_takes_max_line_bytes(command, tmp_path):
    path = tmp_path / "docs.jsonl"
    long = json.dumps({"id": "long", "segments": [{"kind": "text", "text": "y" * 5000}]}).encode()
    write_lines(path, [good_record(i) for i in range(40)] + [long])
    out = {"encode": ["--output", str(tmp_path / "ids.jsonl"), "--tokenizer", str(SAMPLE_TOKENIZER)],
           "data cache": ["--out", str(tmp_path / "cache"), "--tokenizer", str(SAMPLE_TOKENIZER), "--no-progress"],
           "tokenizer train": ["--out", str(tmp_path / "spm"), "--vocab-size", "400"]}[command]
    result = run_cli(*command.split(), "--input", str(path), *out, "--max-line-bytes", "1000", "--strict")
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = error_lines(result.stderr)
    assert f"{path}:41: the line is {len(long)} bytes, longer than the limit of 1000 bytes" in line


def test_an_annotate_text_input_past_the_bound_is_a_record_error(tmp_path):
    from metatrain.annotate.inputs import read_raw_documents
    from metatrain.io import compression

    txt = tmp_path / "long.txt"
    txt.write_bytes(b"z" * (compression.MAX_LINE_BYTES + 10) + b"\n")
    skips = SkipCounter()
    assert list(read_raw_documents([txt], skips=skips)) == []
    assert skips.count == 1 and "longer than the limit" in skips.messages[0]


def test_an_annotate_text_input_past_the_bound_in_many_short_lines_is_a_record_error(tmp_path, monkeypatch):
    from metatrain.annotate import inputs
    from metatrain.annotate.inputs import read_raw_documents

    monkeypatch.setattr(inputs, "MAX_LINE_BYTES", 10_000)
    txt = tmp_path / "long.txt"
    txt.write_text("a short line of text\n" * 1000)
    skips = SkipCounter()
    assert list(read_raw_documents([txt], skips=skips)) == []
    assert skips.count == 1 and "passes 10,000 bytes by line" in skips.messages[0]
