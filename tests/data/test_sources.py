"""JSON Lines sources: the line index, the record reader, skips and strict mode, the split;
sources on local disk and in a bucket (`store`)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from metatrain.data import sources as sources_module
from metatrain.data.sources import JsonlLines, JsonlReader, SkipLog, expand_jsonl_paths, open_records
from metatrain.data.split import id_hash, in_split
from metatrain.errors import UserError
from metatrain.io.compression import LineTooLong

from ..conftest import make_docs, write_jsonl


def test_line_index_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n\n\r\n{"b": 2}\r\n{"c": 3}')  # CRLF, blank lines, no final newline
    lines = JsonlLines([path])
    assert len(lines) == 3
    assert [lines[i][1] for i in range(3)] == [1, 4, 5]
    assert [lines[i][2].strip() for i in range(3)] == [b'{"a": 1}', b'{"b": 2}', b'{"c": 3}']


def test_lines_of_several_files_and_empty_file(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ["1", "2"])
    (tmp_path / "b.jsonl").write_bytes(b"")
    c = write_jsonl(tmp_path / "c.jsonl", ["3"])
    lines = JsonlLines(expand_jsonl_paths(tmp_path / "*.jsonl"))
    assert [(lines[i][0], lines[i][2]) for i in range(len(lines))] == [(str(a), b"1"), (str(a), b"2"), (str(c), b"3")]


def test_missing_sources_are_one_line_naming_the_path(store):
    store.write_text("dir/x.txt", "x")
    for source, message in ((store / "nope.jsonl", "does not exist"), (store / "*.jsonl", "matches no file"),
                            (f"{store}/missing.jsonl", "does not exist"), (f"{store}/shards/*.jsonl", "matches no file"),
                            (f"{store}/dir", "is a directory, and not a token cache")):
        with pytest.raises(UserError, match=message) as raised:
            expand_jsonl_paths(source)
        assert str(source) in str(raised.value) and "\n" not in str(raised.value)


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ('{"id": "x", "segments": []}', "segments` is empty"),
    ('{"id": "y", "segments": [{"kind": "text", "text": "hi", "mdoe": "ai"}]}', "unknown key"),
    ('{"id": "z", "mode": "martian", "segments": [{"kind": "text", "text": "hi"}]}', "martian"),
]


def test_bad_records_are_skipped_and_counted_with_file_and_line(tmp_path, encoder_spec):
    good = make_docs(2)
    path = write_jsonl(tmp_path / "a.jsonl", [good[0], *[b for b, _ in BAD_LINES], good[1]])
    path.write_bytes(path.read_bytes() + b"\xff\xfe bad utf-8\n")
    log = SkipLog()
    reader = JsonlReader(encoder_spec, split=None, eval_fraction=0.0, strict=False, skips=log)
    lines = JsonlLines([path])
    out = [reader(lines[i]) for i in range(len(lines))]
    assert [o is not None for o in out] == [True, False, False, False, False, True, False]
    skipped = log.drain()
    assert [(s.path, s.line) for s in skipped] == [(str(path), line) for line in (2, 3, 4, 5, 7)]
    for error, (_, expected) in zip(skipped, BAD_LINES):
        assert expected in error.reason
    assert "UTF-8" in list(skipped)[-1].reason
    assert len(log.drain()) == 0


def test_strict_reader_stops_with_file_and_line(tmp_path, encoder_spec):
    path = write_jsonl(tmp_path / "a.jsonl", [make_docs(1)[0], "{not json"])
    reader = JsonlReader(encoder_spec, split=None, eval_fraction=0.0, strict=True, skips=SkipLog())
    lines = JsonlLines([path])
    assert reader(lines[0]) is not None
    with pytest.raises(UserError, match=f"{path}:2: invalid JSON"):
        reader(lines[1])


def test_reader_output_is_the_shifted_encoding(tmp_path, encoder_spec, encoder):
    from metatrain.documents import parse_document

    doc = make_docs(1)[0]
    path = write_jsonl(tmp_path / "a.jsonl", [doc])
    reader = JsonlReader(encoder_spec, split=None, eval_fraction=0.0, strict=True, skips=SkipLog())
    example = reader(JsonlLines([path])[0])["example"]
    enc = encoder.encode(parse_document(doc, path="", line=0))
    np.testing.assert_array_equal(example[:, 0], enc.ids[:-1])
    np.testing.assert_array_equal(example[:, 1], enc.ids[1:])
    np.testing.assert_array_equal(example[:, 2], enc.roles[1:])


def test_split_is_stable_and_near_the_fraction():
    assert id_hash("doc-1") == id_hash("doc-1") != id_hash("doc-2")
    hashes = [id_hash(f"doc-{i}") for i in range(20_000)]
    held = sum(in_split(h, "eval", 0.05) for h in hashes)
    assert abs(held / 20_000 - 0.05) < 4 * np.sqrt(0.05 * 0.95 / 20_000)
    assert all(in_split(h, "eval", 0.05) != in_split(h, "train", 0.05) for h in hashes[:500])


SOURCES = ("plain.jsonl", "shards/*.jsonl", "shards/b.jsonl.gz", "corpus.parquet", "corpus.array_record")


def _relative(records, root: str) -> list:
    return [(path[len(root):], number, raw) for path, number, raw in (records[i] for i in range(len(records)))]


@pytest.mark.parametrize("source", SOURCES)
def test_a_source_in_a_store_gives_the_records_of_the_local_files(stored_corpus, source, monkeypatch):
    _, root, store = stored_corpus
    remote = f"{store}/corpus"
    monkeypatch.setattr(sources_module, "_INDEX_CHUNK", 7)  # lines cross the chunks a remote file streams in
    local_files, remote_files = expand_jsonl_paths(f"{root}/{source}"), expand_jsonl_paths(f"{remote}/{source}")
    assert [str(f)[len(remote):] for f in remote_files] == [str(f)[len(str(root)):] for f in local_files]
    want = _relative(open_records(local_files), str(root))
    assert want and _relative(open_records(remote_files), remote) == want


def test_records_in_a_store_pickle_and_read_in_another_process(stored_corpus, tmp_path):
    _, _, store = stored_corpus
    parts = [open_records(expand_jsonl_paths(f"{store}/corpus/{s}")) for s in ("plain.jsonl", "corpus.parquet",
                                                                               "corpus.array_record")]
    want = [[p[i] for i in (0, 3, len(p) - 1)] for p in parts]
    pickled = tmp_path / "records.pkl"
    pickled.write_bytes(pickle.dumps(parts))
    code = ("import pickle, sys; parts = pickle.load(open(sys.argv[1], 'rb')); "
            "pickle.dump([[p[i] for i in (0, 3, len(p) - 1)] for p in parts], sys.stdout.buffer)")
    out = subprocess.run([sys.executable, "-c", code, str(pickled)], capture_output=True, check=True,
                         env=store.env())
    assert pickle.loads(out.stdout) == want


@pytest.mark.hostile
def test_a_line_past_the_bound_is_refused_from_its_length_unread(tmp_path, encoder_spec):
    good = make_docs(2)
    path = write_jsonl(tmp_path / "a.jsonl", [good[0], "x" * 50_000, good[1]])
    lines = JsonlLines([path], max_line_bytes=10_000)
    assert lines[1][2] == LineTooLong(length=50_000, limit=10_000, ended=True)  # its bytes are never read
    assert pickle.loads(pickle.dumps(lines))[1] == lines[1]  # the bound travels to grain's workers
    log = SkipLog()
    reader = JsonlReader(encoder_spec, split=None, eval_fraction=0.0, strict=False, skips=log)
    assert [reader(lines[i]) is not None for i in range(3)] == [True, False, True]
    (skipped,) = log.drain()
    assert (skipped.path, skipped.line) == (str(path), 2)
    assert skipped.reason.startswith("the line is 50000 bytes, longer than the limit of 10000 bytes")
    strict = JsonlReader(encoder_spec, split=None, eval_fraction=0.0, strict=True, skips=SkipLog())
    with pytest.raises(UserError, match=f"{path}:2: the line is 50000 bytes"):
        strict(lines[1])
    assert open_records([path], max_line_bytes=10_000)[1] == lines[1]


@pytest.mark.hostile
def test_a_device_or_fifo_source_is_named_as_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    for source in ("/dev/zero", fifo):
        with pytest.raises(UserError, match=f"^data source {source} is not a regular file .*give a JSON Lines"):
            expand_jsonl_paths(source)
