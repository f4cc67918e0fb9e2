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
