"""The JSON Lines document format: parsing, and the reader's skip-count-or-stop behaviour;
files read from local disk and from a bucket (`store`)."""

from __future__ import annotations

import gzip
import json
import logging
import sys

import pytest

from metatrain.documents import Document, Segment, SkipCounter, parse_document, read_documents
from metatrain.errors import UserError
from metatrain.io.formats import RecordError
from metatrain.io.storage import as_path

GOOD = {"id": "d1", "mode": "ai", "source": "meta is kept out of the way",
        "segments": [{"kind": "text", "text": "Hello\n"},
                     {"kind": "thinking", "text": "Hm.", "control": "good"},
                     {"kind": "text", "text": "Quote", "mode": "ai_quoting_human"}]}


def test_parse_good_document():
    doc = parse_document(GOOD, path="f.jsonl", line=3)
    assert doc == Document("d1", (Segment("text", "Hello\n"), Segment("thinking", "Hm.", control="good"),
                                  Segment("text", "Quote", mode="ai_quoting_human")), mode="ai")
    assert (doc.path, doc.line) == ("f.jsonl", 3)


def test_defaults_id_and_mode():
    doc = parse_document({"segments": [{"kind": "thinking", "text": ""}]}, path="f.jsonl", line=7)
    assert doc.id == "f.jsonl:7" and doc.mode == "human"
    assert parse_document({"id": 12, "segments": [{"kind": "text", "text": "x"}]}, path="f", line=1).id == "12"


@pytest.mark.parametrize(
    "record, reason",
    [
        ([1, 2], "a document must be a JSON object, got list"),
        ({"id": "x"}, "missing `segments`"),
        ({"id": "x", "segments": "text"}, "`segments` must be a list, got str"),
        ({"id": "x", "segments": {"kind": "text"}}, "`segments` must be a list, got dict"),
        ({"id": "x", "segments": []}, "`segments` is empty"),
        ({"id": "x", "segments": [{"kind": "prose", "text": "a"}]}, "segment 0 has unknown kind 'prose'"),
        ({"id": "x", "segments": [{"text": "a"}]}, "segment 0 has no `kind`"),
        ({"id": "x", "segments": [{"kind": "text"}]}, "segment 0 has no `text`"),
        ({"id": "x", "segments": [{"kind": "text", "text": 5}]}, "`text` must be a string, got int"),
        ({"id": "x", "segments": [{"kind": "text", "text": None}]}, "`text` must be a string, got NoneType"),
        ({"id": "x", "segments": [{"kind": "text", "text": ""}]}, "needs non-empty `text`"),
        ({"id": "x", "segments": [{"kind": "text", "text": "a\ud800b"}]}, "lone surrogate"),
        ({"id": "x", "segments": [{"kind": "text", "text": "a", "mdoe": "ai"}]}, r"unknown key\(s\) \['mdoe'\]"),
        ({"id": "x", "segments": [{"kind": "text", "text": "a", "mode": 3}]}, "`mode` must be a non-empty string"),
        ({"id": "x", "segments": [{"kind": "text", "text": "a", "control": ""}]}, "`control` must be a non-empty"),
        ({"id": "x", "segments": ["just text"]}, "segment 0 must be an object"),
        ({"id": "x", "mode": None, "segments": [{"kind": "text", "text": "a"}]}, "`mode` must be a non-empty"),
        ({"id": ["x"], "segments": [{"kind": "text", "text": "a"}]}, "`id` must be a string or an integer"),
        ({"id": True, "segments": [{"kind": "text", "text": "a"}]}, "`id` must be a string or an integer"),
    ],
)
def test_bad_records_say_file_line_id_and_reason(record, reason):
    with pytest.raises(RecordError, match=reason) as info:
        parse_document(record, path="in.jsonl", line=4)
    err = info.value
    assert (err.path, err.line) == ("in.jsonl", 4)
    if isinstance(record, dict) and isinstance(record.get("id"), str):
        assert err.doc_id == "x"
        assert str(err).startswith("in.jsonl:4 (document 'x'): ")


def _write(path, lines: list[bytes | str | dict]) -> None:
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line, ensure_ascii=False)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")


def _doc(i: int) -> dict:
    return {"id": f"ok-{i}", "segments": [{"kind": "text", "text": f"text {i} é"}]}


BAD_LINES = [
    b'{"id": "broken", "segments": [',  # invalid JSON
    b'{"id": "bytes", "segments": [{"kind": "text", "text": "caf\xe9"}]}',  # invalid UTF-8 (latin-1)
    {"id": "nosegs"},
    {"id": "kind", "segments": [{"kind": "poem", "text": "a"}]},
]


def test_reader_skips_and_counts_bad_records_and_keeps_every_good_one(tmp_path, caplog):
    path = tmp_path / "docs.jsonl"
    _write(path, [_doc(0), BAD_LINES[0], _doc(1), "", BAD_LINES[1], BAD_LINES[2], _doc(2), BAD_LINES[3], _doc(3)])
    skips = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="metatrain.documents"):
        docs = list(read_documents(path, skips=skips))
    assert [d.id for d in docs] == ["ok-0", "ok-1", "ok-2", "ok-3"]
    assert [d.line for d in docs] == [1, 3, 7, 9]
    assert docs[0].segments[0].text == "text 0 é"
    assert skips.count == 4
    assert skips.messages == [
        f"{path}:2: invalid JSON: Expecting value at column 31",
        f"{path}:5: invalid UTF-8 at byte {BAD_LINES[1].index(0xE9)} of the line: " + repr(b'\xe9"}]'),
        f"{path}:6 (document 'nosegs'): missing `segments` (a list of {{kind, text}} objects)",
        f"{path}:8 (document 'kind'): segment 0 has unknown kind 'poem'; expected one of text, thinking",
    ]
    assert len([r for r in caplog.records if "skipping bad record" in r.getMessage()]) == 4


@pytest.mark.parametrize("bad_line", BAD_LINES, ids=["json", "utf8", "segments", "kind"])
def test_strict_stops_at_the_first_bad_record(tmp_path, bad_line):
    path = tmp_path / "docs.jsonl"
    _write(path, [_doc(0), bad_line, _doc(1)])
    reader = read_documents(path, strict=True)
    assert next(reader).id == "ok-0"
    with pytest.raises(RecordError) as info:
        next(reader)
    assert (info.value.path, info.value.line) == (str(path), 2)


def test_reader_reads_several_files_in_order(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write(a, [_doc(0), _doc(1)])
    _write(b, [_doc(2)])
    assert [d.id for d in read_documents([a, str(b)])] == ["ok-0", "ok-1", "ok-2"]


def test_reader_refuses_a_missing_file_in_one_line_naming_it(store):
    missing = f"{store}/missing.jsonl"
    with pytest.raises(RecordError, match="cannot open: No such file or directory") as raised:
        list(read_documents(missing))
    assert raised.value.path == missing and "\n" not in str(raised.value)


def test_a_file_in_a_store_reads_like_the_local_file(store, tmp_path):
    _write(tmp_path / "d.jsonl", [GOOD, "{broken", *(_doc(i) for i in range(11)), BAD_LINES[1]])
    store.upload("d.jsonl", tmp_path / "d.jsonl")
    want = list(read_documents(tmp_path / "d.jsonl"))
    assert len(want) == 12 and list(read_documents(f"{store}/d.jsonl")) == want


@pytest.mark.bucket
def test_read_documents_expands_a_remote_glob(bucket, tmp_path):
    """Only a remote glob is expanded (no shell expands one); a local path is read as it is."""
    docs = [_doc(i) for i in range(9)]
    _write(tmp_path / "a.jsonl", docs[:4])
    _write(tmp_path / "b.jsonl", docs[4:])
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress((tmp_path / "b.jsonl").read_bytes()))
    for name in ("a.jsonl", "b.jsonl.gz"):
        as_path(f"{bucket}/docs/{name}").write_bytes((tmp_path / name).read_bytes())
    as_path(f"{bucket}/docs/notes.txt").write_text("Not matched by the glob.\n")
    want = list(read_documents([tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"]))
    assert len(want) == len(docs) and list(read_documents(f"{bucket}/docs/*.jsonl*")) == want
    with pytest.raises(UserError, match=f"^input {bucket}/none/\\*.jsonl: the pattern matches no file$"):
        list(read_documents(f"{bucket}/none/*.jsonl"))


def test_reader_splits_lines_only_at_newline_bytes(tmp_path):
    """U+2028 and \\r inside a record are text, not line breaks."""
    path = tmp_path / "docs.jsonl"
    text = "a\u2028b\u0085c\rd"
    _write(path, [{"id": "u", "segments": [{"kind": "text", "text": text}]}])
    (doc,) = read_documents(path, strict=True)
    assert doc.segments[0].text == text


def test_skip_counter_keeps_only_the_first_messages():
    skips = SkipCounter(max_messages=2)
    for i in range(5):
        skips.add(RecordError("f", i + 1, "bad"))
    assert skips.count == 5 and skips.messages == ["f:1: bad", "f:2: bad"]
    assert skips.summary() == "skipped 5 bad records"
    assert SkipCounter(count=1).summary() == "skipped 1 bad record"


def _size(seen) -> int:
    """Bytes of the skip counter's memory of records: the container and what it holds."""
    items = [x for kv in seen.items() for x in kv] if isinstance(seen, dict) else list(seen)
    return sys.getsizeof(seen) + sum(sys.getsizeof(x) for x in items)


@pytest.mark.hostile
def test_a_skipped_record_costs_one_bit_and_still_counts_once():
    skips = SkipCounter(max_messages=1)
    for line in range(1, 3_000_001):
        skips.add(RecordError("big.jsonl", line, "bad"))
    assert _size(skips._seen) < 1 << 20  # a set of (path, line) tuples held ~430 MB
    skips.add(RecordError("big.jsonl", 2_999_999, "bad"))  # read again (the next epoch): counted once
    skips.add(RecordError("big.jsonl", 0, "cannot open"))  # line 0 names the file itself
    skips.add(RecordError("other.jsonl", 7, "bad"))
    skips.add(RecordError("other.jsonl", 7, "bad"))
    assert skips.count == 3_000_002 and skips.messages == ["big.jsonl:1: bad"]


@pytest.mark.hostile
def test_a_line_past_the_bound_is_a_counted_record_error_and_stops_strict_mode(tmp_path):
    path = tmp_path / "docs.jsonl"
    _write(path, [_doc(0), b"x" * 5000, _doc(1)])
    skips = SkipCounter()
    assert [d.id for d in read_documents(path, skips=skips, max_line_bytes=1000)] == ["ok-0", "ok-1"]
    assert skips.count == 1
    assert skips.messages == [(f"{path}:2: the line is 5000 bytes, longer than the limit of 1000 bytes; it was "
                               "skipped unread (split the document, or raise the limit: data.max_line_bytes in "
                               "training, --max-line-bytes for the commands)")]
    with pytest.raises(RecordError, match=f"^{path}:2: the line is 5000 bytes"):
        list(read_documents(path, strict=True, max_line_bytes=1000))


@pytest.mark.hostile
def test_a_file_with_no_line_end_is_one_counted_record_error():
    skips = SkipCounter()
    assert list(read_documents(["/dev/zero", "/dev/null"], skips=skips, max_line_bytes=1000)) == []
    (message,) = skips.messages
    assert message.startswith("/dev/zero:1: no line end within ")
    assert message.endswith("bytes (the limit on a line is 1000 bytes); is it a JSON Lines file? The rest "
                            "of the file was not read")
