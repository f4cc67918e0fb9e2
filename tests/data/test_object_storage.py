"""Data sources and token caches in a bucket (`gs://`, against the GCS emulator) read and
write exactly what the same files give on local disk."""

from __future__ import annotations

import dataclasses
import gzip
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from metatrain.data import make_batch_iterator
from metatrain.data import sources as sources_module
from metatrain.data.cache import TokenCache, is_cache_dir, write_cache
from metatrain.data.sources import EncoderSpec, expand_jsonl_paths, open_records
from metatrain.errors import UserError
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_TOKENIZER
from metatrain.io.storage import as_path

from .conftest import assert_batches_equal, data_config, make_docs, take
from .test_formats import documents_parquet, write_array_record

CLI = "import sys; from metatrain.cli import main; sys.exit(main())"  # `metatrain ARGS...`
SOURCES = ("plain.jsonl", "shards/*.jsonl", "shards/b.jsonl.gz", "corpus.parquet", "corpus.array_record")


def _jsonl_bytes(records: list, *, crlf: bool = False, final_newline: bool = True) -> bytes:
    end = "\r\n" if crlf else "\n"
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    return (end.join(lines) + (end if final_newline else "")).encode("utf-8")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, gcs_emulator):
    """The same files on local disk and in a bucket: `(docs, local root, gs:// root)`."""
    root = tmp_path_factory.mktemp("object-storage")
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
    remote = f"gs://{gcs_emulator.bucket()}/corpus"
    for name in [*files, "corpus.parquet", "corpus.array_record"]:
        as_path(f"{remote}/{name}").write_bytes((root / name).read_bytes())
    return docs, root, remote


def _relative(records, root: str) -> list:
    return [(path[len(root):], number, raw) for path, number, raw in (records[i] for i in range(len(records)))]


@pytest.mark.parametrize("source", SOURCES)
def test_a_remote_source_gives_the_records_of_the_local_files(corpus, source, monkeypatch):
    _, root, remote = corpus
    monkeypatch.setattr(sources_module, "_INDEX_CHUNK", 7)  # lines cross the chunks a remote file streams in
    local_files, remote_files = expand_jsonl_paths(f"{root}/{source}"), expand_jsonl_paths(f"{remote}/{source}")
    assert [str(f)[len(remote):] for f in remote_files] == [str(f)[len(str(root)):] for f in local_files]
    want = _relative(open_records(local_files), str(root))
    assert want and _relative(open_records(remote_files), remote) == want


def test_remote_records_pickle_and_read_in_another_process(corpus, gcs_emulator, tmp_path):
    _, _, remote = corpus
    parts = [open_records(expand_jsonl_paths(f"{remote}/{s}")) for s in ("plain.jsonl", "corpus.parquet",
                                                                          "corpus.array_record")]
    want = [[p[i] for i in (0, 3, len(p) - 1)] for p in parts]
    pickled = tmp_path / "records.pkl"
    pickled.write_bytes(pickle.dumps(parts))
    code = ("import pickle, sys; parts = pickle.load(open(sys.argv[1], 'rb')); "
            "pickle.dump([[p[i] for i in (0, 3, len(p) - 1)] for p in parts], sys.stdout.buffer)")
    out = subprocess.run([sys.executable, "-c", code, str(pickled)], capture_output=True, check=True,
                         env=gcs_emulator.env())
    assert pickle.loads(out.stdout) == want


@pytest.mark.parametrize("workers", [0, 2])
def test_training_batches_from_a_remote_glob_equal_the_local_ones(corpus, workers):
    _, root, remote = corpus
    kw = dict(batch_size=2, seq_len=47)
    want = take(make_batch_iterator(data_config(f"{root}/shards/*.jsonl", num_workers=workers), **kw), 5)
    got = take(make_batch_iterator(data_config(f"{remote}/shards/*.jsonl", num_workers=workers), **kw), 5)
    assert_batches_equal(got, want)


def test_a_cache_written_to_a_bucket_equals_the_local_one_and_trains_the_same(corpus, tmp_path, gcs_emulator):
    _, root, remote = corpus
    bucket = remote.split("/")[2]
    as_path(f"gs://{bucket}/tok.model").write_bytes(SAMPLE_TOKENIZER.read_bytes())
    as_path(f"gs://{bucket}/tags.yaml").write_bytes(DEFAULT_TAGS.read_bytes())
    spec = EncoderSpec(f"gs://{bucket}/tok.model", f"gs://{bucket}/tags.yaml", None, "every")
    local_spec = EncoderSpec(str(SAMPLE_TOKENIZER), str(DEFAULT_TAGS), None, "every")
    want = write_cache([root / "plain.jsonl", f"{root}/shards/*.jsonl"], tmp_path / "cache", local_spec, progress=False)
    out = f"gs://{bucket}/cache"
    meta = write_cache([f"{remote}/plain.jsonl", f"{remote}/shards/*.jsonl"], out, spec, progress=False)
    assert is_cache_dir(out) and "cache.json" in [n.split("/")[-1] for n in gcs_emulator.objects(bucket, "cache/")]
    assert meta["tokenizer"]["path"] == f"gs://{bucket}/tok.model" and meta["inputs"][0] == f"{remote}/plain.jsonl"
    for key in ("documents", "tokens", "tokens_by_role", "skipped_records", "mantra", "mantra_policy"):
        assert meta[key] == want[key]
    assert meta["tokenizer"]["sha256"] == want["tokenizer"]["sha256"] and meta["tags"]["sha256"] == want["tags"]["sha256"]
    a, b = TokenCache(tmp_path / "cache"), TokenCache(out)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.id_hashes, b.id_hashes)
    assert len(a) == len(b)
    for i in range(len(a)):
        for x, y in zip(a.document(i), b.document(i)):
            np.testing.assert_array_equal(x, y)
    kw = dict(batch_size=2, seq_len=41)  # read in worker processes, which open the remote arrays themselves
    config = dataclasses.replace(data_config(out, num_workers=2), tokenizer=as_path(spec.tokenizer),
                                 tags=as_path(spec.tags))
    assert_batches_equal(take(make_batch_iterator(config, **kw), 4),
                         take(make_batch_iterator(data_config(tmp_path / "cache", num_workers=2), **kw), 4))


def test_a_failed_remote_cache_build_leaves_nothing(bucket, gcs_emulator, encoder_spec):
    as_path(f"{bucket}/bad.jsonl").write_text("{broken\n[]\n")
    with pytest.raises(UserError, match=f"no valid document in {bucket}/bad.jsonl"):
        write_cache([f"{bucket}/bad.jsonl"], f"{bucket}/cache", encoder_spec, progress=False)
    assert gcs_emulator.objects(bucket[5:], "cache") == []


def test_missing_remote_sources_are_one_line_naming_the_url(bucket):
    as_path(f"{bucket}/dir/x.txt").write_text("x")
    for source, message in ((f"{bucket}/missing.jsonl", "does not exist"), (f"{bucket}/shards/*.jsonl", "matches no file"),
                            (f"{bucket}/dir", "is a directory, and not a token cache")):
        with pytest.raises(UserError, match=message) as raised:
            expand_jsonl_paths(source)
        assert source in str(raised.value) and "\n" not in str(raised.value)


def test_the_cli_caches_remote_inputs_into_a_bucket_and_reports_bad_ones(corpus, gcs_emulator):
    _, _, remote = corpus
    bucket = remote.split("/")[2]
    out = f"gs://{bucket}/cli-cache"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True,
                              env=gcs_emulator.env(), timeout=120)

    as_path(f"gs://{bucket}/cli/tok.model").write_bytes(SAMPLE_TOKENIZER.read_bytes())
    as_path(f"gs://{bucket}/cli/tags.yaml").write_bytes(DEFAULT_TAGS.read_bytes())
    done = cli("data", "cache", "--input", f"{remote}/shards/*.jsonl", "--tokenizer", f"gs://{bucket}/cli/tok.model",
               "--tags", f"gs://{bucket}/cli/tags.yaml", "--out", out, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: 22 documents" in done.stdout
    stats = cli("data", "stats", out, "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["documents"] == 22
    missing = cli("data", "cache", "--input", f"{remote}/missing.jsonl", "--tokenizer", str(SAMPLE_TOKENIZER),
                  "--out", f"gs://{bucket}/c2", "--no-progress")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert f"{remote}/missing.jsonl does not exist" in missing.stderr
