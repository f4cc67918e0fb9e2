"""Compressed corpora (`metatrain.io.compression`): gzip, bzip2, xz and zstd files read by both
read paths (documents and the training line index), several zstd frames, globs that find
compressed files, and compressed or damaged files under the wrong name, each named in one line.

Moved from tests/test_hostile_records.py, whose `hostile` mark they keep (issue 13).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import pickle

import pytest
import zstandard

from metatrain.data.sources import JsonlLines, expand_jsonl_paths
from metatrain.documents import SkipCounter, read_documents
from metatrain.errors import UserError
from metatrain.io import compression
from metatrain.io.compression import SKIP_FACTOR, LineTooLong, iter_lines

from ..conftest import good_record, line_records, write_lines

pytestmark = pytest.mark.hostile

OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": zstandard.open}


@pytest.mark.parametrize("suffix", OPENERS)
def test_compressed_corpora_are_read_by_both_paths(tmp_path, suffix):
    lines = [good_record(0), b"{broken", b"", good_record(1), good_record(2)]
    plain, packed = tmp_path / "plain.jsonl", tmp_path / f"docs.jsonl{suffix}"
    write_lines(plain, lines)
    write_lines(packed, lines, OPENERS[suffix])
    skips = SkipCounter()
    docs = list(read_documents(packed, skips=skips))
    assert [(d.id, d.line, d.path) for d in docs] == [("ok-0", 1, str(packed)), ("ok-1", 4, str(packed)),
                                                      ("ok-2", 5, str(packed))]
    assert skips.messages == [f"{packed}:2: invalid JSON: Expecting property name enclosed in double quotes at column 2"]
    records = JsonlLines(expand_jsonl_paths(packed))
    assert [(p, n, raw) for p, n, raw in line_records(records)] == [
        (str(packed), n, raw) for _, n, raw in line_records(JsonlLines([plain]))]
    copy = pickle.loads(pickle.dumps(records))  # what a grain worker gets
    assert line_records(copy) == line_records(records)


def test_zstd_files_of_several_frames_are_read_whole(tmp_path):
    path = tmp_path / "docs.jsonl.zst"
    compressor = zstandard.ZstdCompressor()
    path.write_bytes(compressor.compress(good_record(0) + b"\n") + compressor.compress(good_record(1) + b"\n"))
    assert [d.id for d in read_documents(path)] == ["ok-0", "ok-1"]
    assert len(JsonlLines([path])) == 2


def test_a_glob_finds_compressed_files_and_refuses_twins(tmp_path):
    write_lines(tmp_path / "a.jsonl", [good_record(0)])
    write_lines(tmp_path / "b.jsonl.gz", [good_record(1)], gzip.open)
    write_lines(tmp_path / "c.jsonl.zst", [good_record(2)], zstandard.open)
    files = expand_jsonl_paths(tmp_path / "*.jsonl")
    assert [f.name for f in files] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst"]
    assert [r[2] for r in line_records(JsonlLines(files))] == [good_record(0), good_record(1), good_record(2)]
    write_lines(tmp_path / "a.jsonl.gz", [good_record(0)], gzip.open)
    with pytest.raises(UserError, match=r"matches both .*a\.jsonl and .*a\.jsonl\.gz"):
        expand_jsonl_paths(tmp_path / "*.jsonl")


@pytest.mark.parametrize("opener, kind, suffix", [(gzip.open, "gzip", ".gz"), (zstandard.open, "zstd", ".zst"),
                                                   (bz2.open, "bzip2", ".bz2"), (lzma.open, "xz", ".xz")])
def test_a_compressed_file_under_a_plain_name_is_named_as_such(tmp_path, opener, kind, suffix):
    path = tmp_path / "docs.jsonl"
    write_lines(path, [good_record(0)], opener)
    expected = f"{path} is {kind}-compressed; name it {path}{suffix} so metatrain decompresses it"
    with pytest.raises(UserError, match="^" + expected):
        list(read_documents(path))
    with pytest.raises(UserError, match="^" + expected):
        JsonlLines([path])


def test_a_damaged_compressed_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    write_lines(path, [good_record(i) for i in range(200)], gzip.open)
    path.write_bytes(path.read_bytes()[:-30])  # truncated
    with pytest.raises(UserError, match=f"{path}: cannot decompress it as gzip"):
        list(read_documents(path))
    with pytest.raises(UserError, match=f"{path}: cannot decompress it as gzip"):
        JsonlLines([path])


# -- a bound on the length of a line (issue 25) ---------------------------------------------

LIMIT = 1000  # a small bound keeps these fast; the default is `MAX_LINE_BYTES`


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_a_line_past_the_bound_is_skipped_without_being_held_and_reading_goes_on(tmp_path, suffix):
    path = tmp_path / f"docs.jsonl{suffix}"
    at_limit, too_long = b"a" * LIMIT, b"b" * (5 * LIMIT)
    write_lines(path, [good_record(0), at_limit, too_long, good_record(1)], OPENERS.get(suffix, open))
    assert list(iter_lines(path, max_line_bytes=LIMIT)) == [
        good_record(0) + b"\n", at_limit + b"\n", LineTooLong(length=5 * LIMIT, limit=LIMIT, ended=True),
        good_record(1) + b"\n"]


def test_a_file_with_no_line_end_is_abandoned_after_a_bounded_read():
    (only,) = list(iter_lines("/dev/zero", max_line_bytes=LIMIT))  # /dev/zero never ends
    assert only == LineTooLong(length=(SKIP_FACTOR + 1) * LIMIT, limit=LIMIT, ended=False)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64, 1 << 20])
def test_lines_split_the_same_at_every_chunk_boundary(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(compression, "_READ_CHUNK", chunk)
    path = tmp_path / "docs.jsonl"
    lines = [b"x" * n for n in (0, 1, 7, 63, 64, 65, 200, 0, 3)]
    path.write_bytes(b"\n".join(lines))  # no final newline
    expected = [line + b"\n" for line in lines[:-1]] + [lines[-1]]
    for limit in (200, 201, 1 << 20):
        assert list(iter_lines(path, max_line_bytes=limit)) == expected
    assert list(iter_lines(path, max_line_bytes=64))[3:8] == [
        b"x" * 63 + b"\n", b"x" * 64 + b"\n", LineTooLong(65, 64, True), LineTooLong(200, 64, True), b"\n"]
