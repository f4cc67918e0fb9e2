"""Parquet and ArrayRecord corpora: read like JSON Lines by training, `data cache`, `encode` and `annotate`."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from metatrain.annotate.inputs import RawDocument, read_raw_documents
from metatrain.cli import main
from metatrain.data import make_batch_iterator
from metatrain.data.cache import TokenCache, write_cache
from metatrain.data.sources import JsonlLines, JsonlReader, SkipLog, expand_jsonl_paths, open_records
from metatrain.documents import Document, Segment, SkipCounter, read_documents
from metatrain.errors import UserError
from metatrain.io.formats import ARRAY_RECORD, JSONL, PARQUET, ArrayRecords, ParquetRows, RecordError, format_of, read_records

from ..conftest import (assert_batches_equal, data_config, documents_parquet, make_docs, take, write_array_record,
                        write_jsonl, write_parquet)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same 60 documents as JSON Lines, Parquet (struct and JSON segments) and ArrayRecord."""
    root = tmp_path_factory.mktemp("formats")
    docs = make_docs(60, seed=3)
    return docs, {
        "jsonl": write_jsonl(root / "docs.jsonl", docs),
        "parquet": documents_parquet(root / "docs.parquet", docs, row_group_size=7),
        "parquet-json": documents_parquet(root / "json.parquet", docs, segments_as="json", row_group_size=11),
        "array_record": write_array_record(root / "docs.array_record", docs),
    }


def test_format_is_told_by_the_name():
    names = ("a.parquet", "A.PARQUET", "x.array_record", "x.array_record-00001-of-00004", "a.jsonl", "a.jsonl.gz",
             "a.txt", "a.parquet.gz", "a.array_record.bak")
    assert [format_of(n) for n in names] == [PARQUET, PARQUET, ARRAY_RECORD, ARRAY_RECORD] + [JSONL] * 5


@pytest.mark.parametrize("kind", ["parquet", "parquet-json", "array_record"])
def test_documents_and_their_encoding_equal_the_json_lines(corpus, kind, encoder_spec):
    docs, paths = corpus
    want = list(read_documents(paths["jsonl"], strict=True))
    got = list(read_documents(paths[kind], strict=True))
    assert got == want and len(got) == 60
    assert [(d.path, d.line) for d in got] == [(str(paths[kind]), i) for i in range(1, 61)]
    reader = JsonlReader(encoder_spec, split=None, eval_fraction=0.0, strict=True, skips=SkipLog())
    records, lines = open_records([paths[kind]]), JsonlLines([paths["jsonl"]])
    assert len(records) == len(lines) == 60
    for i in range(60):
        a, b = reader.encode_record(records[i]), reader.encode_record(lines[i])
        assert a.doc_id == b.doc_id and a.ids.tolist() == b.ids.tolist() and a.roles.tolist() == b.roles.tolist()


def test_a_text_column_gives_text_only_documents(tmp_path):
    with_ids = write_parquet(tmp_path / "web.parquet", {"id": [7, 8], "text": ["One.", "Two."], "url": ["u", "v"]})
    without = write_parquet(tmp_path / "anon.parquet", {"text": ["Three."], "mode": [None]})
    got = list(read_documents([with_ids, without], strict=True))
    assert got == [Document("7", (Segment("text", "One."),)), Document("8", (Segment("text", "Two."),)),
                   Document(f"{without}:1", (Segment("text", "Three."),), "human")]  # id: file:row


def test_bad_rows_are_skipped_and_counted_naming_file_and_row(tmp_path, encoder_spec):
    text = write_parquet(tmp_path / "text.parquet", {"id": ["a", "b", None, "d", "e"],
                                                     "text": ["fine", None, "no id", "", "fine too"]},
                         row_group_size=2)
    docs = write_parquet(tmp_path / "docs.parquet", {"id": ["f", "g", "h", "i"], "segments": [
        '[{"kind": "text", "text": "fine"}]', '[{"kind": "text", "text": 5}]', '[{"kind": "poem", "text": "x"}]',
        '[{"kind": "text"']})
    typed = write_parquet(tmp_path / "typed.parquet", {"id": [1.5], "text": ["float id"]})
    ints = write_parquet(tmp_path / "ints.parquet", {"text": [3]})
    want = [
        RecordError(str(text), 2, "`text` is null", "b"),
        RecordError(str(text), 3, "`id` is null; in a file with an `id` column every row needs one"),
        RecordError(str(text), 4, "`text` is empty", "d"),
        RecordError(str(docs), 2, "segment 0: `text` must be a string, got int", "g"),
        RecordError(str(docs), 3, "segment 0 has unknown kind 'poem'; expected one of text, thinking", "h"),
        RecordError(str(docs), 4, "`segments`: invalid JSON: Expecting ',' delimiter at column 17", "i"),
        RecordError(str(typed), 1, "`id` must be a string or an integer, got float"),
        RecordError(str(ints), 1, "`text` must be a string, got int"),
    ]
    skips = SkipCounter()
    files = [text, docs, typed, ints]
    assert [d.id for d in read_documents(files, skips=skips)] == ["a", "e", "f"]
    assert skips.messages == [str(e) for e in want]
    # the random-access path of training and `data cache` skips the same rows
    log = SkipLog()
    reader = JsonlReader(encoder_spec, split=None, eval_fraction=0.0, strict=False, skips=log)
    records = open_records(files)
    encoded = [reader.encode_record(records[i]) for i in range(len(records))]
    assert [e.doc_id for e in encoded if e is not None] == ["a", "e", "f"]
    assert list(log.drain()) == want


def test_strict_mode_stops_at_the_first_bad_row_in_one_line(tmp_path, encoder_spec):
    path = write_parquet(tmp_path / "t.parquet", {"id": ["a", "b"], "text": ["fine", None]})
    with pytest.raises(RecordError) as info:
        list(read_documents(path, strict=True))
    assert (info.value.path, info.value.line) == (str(path), 2)
    first_bad = write_parquet(tmp_path / "f.parquet", {"id": ["a", "b"], "text": [None, "fine"]})
    with pytest.raises(UserError, match=f"strict mode is on.*{first_bad}, row 1 .document 'a'.: `text` is null"):
        make_batch_iterator(data_config(first_bad, strict=True, eval_fraction=0.0), batch_size=2, seq_len=31)
    reader = JsonlReader(encoder_spec, split=None, eval_fraction=0.0, strict=True, skips=SkipLog())
    with pytest.raises(UserError) as info:
        reader.encode_record(ParquetRows([path])[1])
    assert str(info.value) == f"bad record (strict mode is on): {RecordError(str(path), 2, '`text` is null', 'b')}"
    assert str(RecordError(str(path), 2, "x")) == f"{path}, row 2: x"
    assert str(RecordError("d.array_record", 3, "x")) == "d.array_record, record 3: x"
    assert str(RecordError("d.jsonl", 3, "x")) == "d.jsonl:3: x"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["parquet", "array_record"])
def test_training_batches_equal_those_of_the_json_lines(corpus, kind):
    _, paths = corpus
    for split in ("train", "eval"):
        kw = dict(batch_size=3, seq_len=53, split=split)
        want = make_batch_iterator(data_config(paths["jsonl"], eval_fraction=0.2), **kw)
        got = make_batch_iterator(data_config(paths[kind], eval_fraction=0.2), **kw)
        if split == "train":
            assert_batches_equal(take(got, 8), take(want, 8))
        else:  # the whole finite split
            assert_batches_equal(list(got), list(want))


def test_reading_a_row_decodes_only_its_row_group(tmp_path, monkeypatch):
    path = documents_parquet(tmp_path / "eight.parquet", make_docs(40), row_group_size=5)
    assert pq.ParquetFile(path).metadata.num_row_groups == 8
    decoded = []
    read_row_group = pq.ParquetFile.read_row_group

    def counting(self, i, *args, **kwargs):
        decoded.append(i)
        return read_row_group(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    rows = ParquetRows([path])
    assert len(rows) == 40 and decoded == []  # the index comes from the footer
    name, number, row = rows[27]
    assert (name, number, row["id"], list(row)) == (str(path), 28, "doc-27", ["id", "segments"])
    assert rows[26][2]["id"] == "doc-26" and decoded == [5]
    assert [rows[i][2]["id"] for i in range(40)] == [f"doc-{i}" for i in range(40)]
    assert decoded == [5, *range(8)]  # in order: each row group once
    decoded.clear()
    assert len(list(read_records(path))) == 40 and decoded == list(range(8))


def test_sources_pickle_and_read_in_another_process(corpus, tmp_path):
    _, paths = corpus
    sources = [ParquetRows([paths["parquet"]]), ArrayRecords([paths["array_record"]])]
    want = [[s[i] for i in (0, 33, 59)] for s in sources]  # opens readers and fills the row-group cache
    pickled = tmp_path / "sources.pkl"
    pickled.write_bytes(pickle.dumps(sources))
    code = ("import pickle, sys; sources = pickle.load(open(sys.argv[1], 'rb')); "
            "pickle.dump([[s[i] for i in (0, 33, 59)] for s in sources], sys.stdout.buffer)")
    out = subprocess.run([sys.executable, "-c", code, str(pickled)], capture_output=True, check=True)
    assert pickle.loads(out.stdout) == want


def test_data_cache_of_each_format_equals_the_cache_of_the_json_lines(corpus, tmp_path, encoder_spec):
    _, paths = corpus
    want = write_cache([paths["jsonl"]], tmp_path / "jsonl", encoder_spec, progress=False)
    assert main(["data", "cache", "--input", str(paths["parquet"]), "--tokenizer", encoder_spec.tokenizer,
                 "--out", str(tmp_path / "parquet"), "--no-progress"]) == 0
    write_cache([paths["array_record"]], tmp_path / "array_record", encoder_spec, progress=False)
    a = TokenCache(tmp_path / "jsonl")
    for kind in ("parquet", "array_record"):
        b = TokenCache(tmp_path / kind)
        for key in ("documents", "tokens", "tokens_by_role", "skipped_records"):
            assert b.meta[key] == want[key]
        np.testing.assert_array_equal(b.offsets, a.offsets)
        np.testing.assert_array_equal(b.id_hashes, a.id_hashes)
        for d in range(len(a)):
            assert [x.tolist() for x in b.document(d)] == [x.tolist() for x in a.document(d)]


def test_encode_reads_parquet_and_array_record(corpus, tmp_path, encoder_spec):
    _, paths = corpus
    outputs = {}
    for kind in ("jsonl", "parquet", "array_record"):
        outputs[kind] = tmp_path / f"{kind}.ids.jsonl"
        assert main(["encode", "--tokenizer", encoder_spec.tokenizer, "--input", str(paths[kind]),
                     "--output", str(outputs[kind])]) == 0
    assert outputs["parquet"].read_text() == outputs["array_record"].read_text() == outputs["jsonl"].read_text()


def test_a_glob_may_mix_formats_in_name_order(corpus, tmp_path):
    docs, _ = corpus
    write_jsonl(tmp_path / "a.jsonl", docs[:10])
    documents_parquet(tmp_path / "b.parquet", docs[10:25])
    write_array_record(tmp_path / "c.array_record", docs[25:])
    records = open_records(expand_jsonl_paths(tmp_path / "*"))
    assert len(records) == 60
    assert [(records[i][0].rsplit("/", 1)[1], records[i][1]) for i in (0, 10, 59)] == [
        ("a.jsonl", 1), ("b.parquet", 1), ("c.array_record", 35)]


@pytest.mark.parametrize("name", ["bad.parquet", "bad.array_record"])
def test_a_file_of_another_format_is_one_user_error_naming_it(tmp_path, capsys, encoder_spec, name):
    path = tmp_path / name
    write_jsonl(path, make_docs(2))
    message = f"{path} is not a valid {'Parquet' if name.endswith('parquet') else 'ArrayRecord'} file"
    with pytest.raises(UserError, match=message):
        open_records([path])
    with pytest.raises(UserError, match=message):
        list(read_documents(path))
    with pytest.raises(UserError, match=message):
        make_batch_iterator(data_config(path), batch_size=2, seq_len=31)
    assert main(["encode", "--tokenizer", encoder_spec.tokenizer, "--input", str(path),
                 "--output", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_parquet_file_needs_a_text_or_a_segments_column(tmp_path):
    neither = write_parquet(tmp_path / "neither.parquet", {"id": ["a"], "body": ["x"]})
    both = write_parquet(tmp_path / "both.parquet", {"text": ["x"], "segments": ["[]"]})
    for path, which in ((neither, "neither"), (both, "both")):
        with pytest.raises(UserError, match=f"{path}: a Parquet corpus has a `text` column .* this file has {which}"):
            ParquetRows([path])


def test_annotate_reads_rows_and_records_with_their_metadata(tmp_path):
    rows = write_parquet(tmp_path / "web.parquet", {"text": ["Hello.", " ", "Bye."], "title": ["T", "U", None]})
    records = write_array_record(tmp_path / "more.array_record", [
        {"id": "r", "text": "Raw.", "url": "u"}, {"id": "s", "segments": [{"kind": "text", "text": "Doc."}]}, "{bad"])
    skips = SkipCounter()
    got = list(read_raw_documents([rows, records], skips=skips))
    assert got == [RawDocument("web.parquet:1", (Segment("text", "Hello."),), metadata={"title": "T"}),
                   RawDocument("web.parquet:3", (Segment("text", "Bye."),), metadata={"title": None}),
                   RawDocument("r", (Segment("text", "Raw."),), metadata={"url": "u"}),
                   RawDocument("s", (Segment("text", "Doc."),))]
    assert skips.messages == [
        f"{rows}, row 2 (document 'web.parquet:2'): no text to annotate (the text segments are empty or only whitespace)",
        f"{records}, record 3: invalid JSON: Expecting property name enclosed in double quotes at column 2"]
