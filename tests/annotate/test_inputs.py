"""The annotate reader: raw text and metatrain documents in JSON Lines, .txt files, globs,
directories, on local disk and in a bucket (`store`)."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma

import pytest

from metatrain.annotate.inputs import RawDocument, expand_inputs, input_kind, read_raw_documents
from metatrain.documents import Segment, SkipCounter
from metatrain.errors import UserError
from metatrain.io.formats import RecordError

from ..conftest import write_jsonl


def read(inputs, **kwargs) -> list[RawDocument]:
    return list(read_raw_documents(inputs, **kwargs))


def test_raw_records_keep_id_text_and_metadata_in_order(tmp_path):
    path = tmp_path / "web.jsonl"
    write_jsonl(path, [{"url": "u", "id": 7, "text": "Hello\r\nworld ", "title": "T"},
                       {"text": "No id.", "mode": "ai"}])
    first, second = read([path])
    assert first == RawDocument("7", (Segment("text", "Hello\r\nworld "),), "human", {"url": "u", "title": "T"})
    assert list(first.metadata) == ["url", "title"]
    assert (first.path, first.line, first.text) == (str(path), 1, "Hello\r\nworld ")
    assert (second.id, second.mode, second.metadata) == ("web.jsonl:2", "ai", {})  # the name, not the path


def test_metatrain_documents_keep_their_segments(tmp_path):
    path = tmp_path / "docs.jsonl"
    segments = [{"kind": "text", "text": "A.\n\n"}, {"kind": "thinking", "text": "hm", "control": "good"},
                {"kind": "text", "text": "B.", "mode": "ai"}]
    write_jsonl(path, [{"id": "d", "segments": segments, "mode": "human", "source": "x"},
                       "", {"segments": [{"kind": "text", "text": "C"}]}])
    doc, no_id = read(path)
    assert doc.segments == (Segment("text", "A.\n\n"), Segment("thinking", "hm", control="good"),
                            Segment("text", "B.", mode="ai"))
    assert (doc.text, doc.metadata) == ("A.\n\nB.", {"source": "x"})
    assert (no_id.id, no_id.line) == ("docs.jsonl:3", 3)  # blank lines count


@pytest.mark.parametrize("record, reason", [
    ({"id": "x", "text": "a", "segments": []}, "this one has both"),
    ({"id": "x", "title": "t"}, "this one has neither"),
    ({"id": "x", "text": ""}, "no text to annotate"),
    ({"id": "x", "text": " \n\t"}, "no text to annotate"),
    ({"id": "x", "text": 3}, "`text` must be a string, got int"),
    ('{"id": "x", "text": "\\ud800"}', "lone surrogate"),
    ({"id": True, "text": "a"}, "`id` must be a string or an integer, got bool"),
    ({"id": "", "text": "a"}, "`id` is empty"),
    ({"id": "x", "text": "a", "mode": ""}, "`mode` must be a non-empty string"),
    ({"id": "x", "segments": [{"kind": "thinking", "text": "only thinking"}]}, "no text to annotate"),
    ({"id": "x", "segments": [{"kind": "text", "text": "a", "mdoe": "ai"}]}, "unknown key(s) ['mdoe']"),
    ([1], "a record must be a JSON object, got list"),
])
def test_bad_records_are_skipped_counted_or_raised(tmp_path, record, reason):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"id": "ok1", "text": "fine"}, record, {"id": "ok2", "text": "fine"}])
    skips = SkipCounter()
    assert [d.id for d in read([path], skips=skips)] == ["ok1", "ok2"]
    assert skips.count == 1 and reason in skips.messages[0] and f"{path}:2" in skips.messages[0]
    with pytest.raises(RecordError, match=r":2\b") as e:
        read([path], strict=True)
    assert reason in e.value.reason


def test_invalid_json_utf8_and_duplicate_keys_are_record_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"id": "a", "text": "x"\n'
                     b'{"id": "b", "text": "\xff"}\n'
                     b'{"id": "c", "text": "x", "text": "y"}\n'
                     b'\xef\xbb\xbf{"id": "d", "text": "BOM ok"}\n')
    skips = SkipCounter()
    assert [d.id for d in read(path, skips=skips)] == ["d"]
    reasons = " | ".join(skips.messages)
    assert "invalid JSON" in reasons and "invalid UTF-8 at byte" in reasons and "duplicate key 'text'" in reasons


def test_duplicate_ids_across_files_refuse_the_second(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": "same", "text": "first"}])
    write_jsonl(tmp_path / "b.jsonl", [{"id": "same", "text": "second"}, {"id": 1, "text": "x"},
                                       {"id": "1", "text": "int and str ids are the same id"}])
    (tmp_path / "same.txt").write_text("third", encoding="utf-8")
    skips = SkipCounter()
    docs = read([tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "same.txt"], skips=skips)
    assert [(d.id, d.text) for d in docs] == [("same", "first"), ("1", "x")]
    assert skips.count == 3 and all("duplicate id (first at " in m for m in skips.messages)
    assert f"first at {tmp_path / 'a.jsonl'}:1" in skips.messages[0]


@pytest.mark.parametrize("data", [
    "plain",
    "no final newline\r\nwindows lines\r\n\r\nand a lone \r in the middle",
    "\n\nleading blank lines, trailing spaces   \n\n\n",
    "emoji 😀, CJK 中文。, NUL \x00 and ▁ survive",
])
@pytest.mark.parametrize("suffix, opener", [
    ("", open), (".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open),
])
def test_txt_files_keep_their_text_exactly(tmp_path, data, suffix, opener):
    path = tmp_path / f"notes.v2.txt{suffix}"
    with opener(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + data.encode("utf-8"))
    (doc,) = read([path])
    assert doc == RawDocument("notes.v2", (Segment("text", data),), "human", {})
    assert (doc.path, doc.line) == (str(path), 1)


def test_zstd_compressed_inputs(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    (tmp_path / "a.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("zst text\r\n".encode()))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "j"}\n'))
    assert [(d.id, d.text) for d in read([tmp_path])] == [("a", "zst text\r\n"), ("b.jsonl.zst:1", "j")]


def test_txt_errors_name_the_byte(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"line one\nline \xc3( two")
    (tmp_path / "empty.txt").write_bytes(b"\xef\xbb\xbf \n")
    skips = SkipCounter()
    assert read([bad, tmp_path / "empty.txt"], skips=skips) == []
    assert skips.messages[0] == f"{bad}:2 (document 'bad'): invalid UTF-8 at byte 14 of the file: b'\\xc3( t'"
    assert "no text to annotate" in skips.messages[1]
    with pytest.raises(RecordError, match="invalid UTF-8 at byte 14"):
        read([bad], strict=True)


def test_a_compressed_file_under_a_plain_name_is_refused(tmp_path):
    path = tmp_path / "packed.txt"
    path.write_bytes(gzip.compress(b"hello"))
    with pytest.raises(UserError, match=r"gzip-compressed; name it .*packed\.txt\.gz"):
        read([path])


def test_directories_and_globs_expand_sorted(tmp_path):
    for name in ("b.txt", "a.jsonl", "c.txt.gz", "README.md", "z.json"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_bytes(b"x")
    assert [p.name for p in expand_inputs([tmp_path])] == ["a.jsonl", "b.txt", "c.txt.gz"]
    assert [p.name for p in expand_inputs(str(tmp_path / "*.txt*"))] == ["b.txt", "c.txt.gz"]
    assert [p.name for p in expand_inputs([tmp_path / "b.txt", str(tmp_path / "s*")])] == ["b.txt", "d.txt"]


@pytest.mark.parametrize("make, given, message", [
    (lambda d: None, "nothing-*.txt", "the pattern matches no file"),
    (lambda d: None, "missing.txt", "no such file or directory"),
    (lambda d: (d / "notes.md").write_text("x"), "notes.md", "is not a .txt, .jsonl, .parquet or .array_record file"),
    (lambda d: (d / "notes.md").write_text("x"), "*.md", r"notes\.md \(from .*\*\.md\) is not a"),
    (lambda d: (d / "e").mkdir(), "e", "holds no input files"),
])
def test_inputs_that_name_no_input_are_user_errors(tmp_path, make, given, message):
    make(tmp_path)
    with pytest.raises(UserError, match=message):
        read_raw_documents([str(tmp_path / given)])  # raised at the call, before any reading


def test_a_file_given_twice_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UserError, match="is given twice"):
        expand_inputs([tmp_path / "a.txt", str(tmp_path / "*.txt")])


def test_input_kind():
    assert [input_kind(n) for n in ("a.jsonl", "a.JSONL.GZ", "a.txt.xz", "a.json", "a.gz", "txt")] == [
        "jsonl", "jsonl", "txt", None, None, None]
    assert [input_kind(n) for n in ("a.parquet", "a.array_record-00000-of-00002", "a.parquet.gz")] == [
        "parquet", "array_record", None]


DOCS = [{"id": f"d{i}", "segments": [{"kind": "text", "text": f"Document {i} says something."}]} for i in range(9)]


@pytest.fixture
def inputs(store, tmp_path):
    """The same inputs (a directory of JSON Lines, compressed JSON Lines and text) on local
    disk and in `store`: `(local root, store)`."""
    files = {
        "docs/a.jsonl": "\n".join(json.dumps(d) for d in DOCS[:4]).encode() + b"\n",
        "docs/b.jsonl.gz": gzip.compress(("\n".join(json.dumps(d) for d in DOCS[4:]) + "\n").encode()),
        "docs/notes.txt": "A whole file is one document.\n".encode(),
    }
    local = tmp_path / "local"
    for name, data in files.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
        store.write_bytes(name, data)
    return local, store


@pytest.mark.parametrize("given", ["docs", "docs/*.jsonl*", "docs/b.jsonl.gz"])
def test_inputs_in_a_store_read_like_the_local_files(inputs, given):
    local, store = inputs
    remote = store.url
    local_files, remote_files = expand_inputs(f"{local}/{given}"), expand_inputs(f"{remote}/{given}")
    assert [str(f)[len(remote):] for f in remote_files] == [str(f)[len(str(local)):] for f in local_files]
    want = list(read_raw_documents(f"{local}/{given}"))
    got = list(read_raw_documents(f"{remote}/{given}"))
    assert want and got == want and all(d.path.startswith(f"{remote}/docs/") for d in got)


def test_missing_inputs_are_one_line_naming_the_path(store):
    for given, message in ((f"{store}/none/*.jsonl", "the pattern matches no file"),
                           (f"{store}/missing.jsonl", "no such file or directory")):
        with pytest.raises(UserError, match=message) as raised:
            expand_inputs(given)
        assert str(raised.value) == f"input {given}: {message}"
