"""`metatrain annotate --out gs://...` against the GCS emulator: the same bytes as a local
`--out`, a run stopped by SIGTERM resumed in the bucket, and refusals that change no object."""

from __future__ import annotations

import signal
import time

import pytest

from metatrain.io.storage import as_path, gcs_client, split_bucket

from .chat_server import ChatServer, Fault
from .test_annotate import _many, _subprocess_annotate, annotate, doc_of, write_raw

SUFFIXES = ("", ".failed.jsonl", ".annotate.json")


@pytest.fixture()
def raw(tmp_path):
    return write_raw(tmp_path / "raw.jsonl")


def snapshot(bucket: str) -> dict[str, tuple[int, str]]:
    """Every object of `bucket`: its generation and MD5 (a rewrite changes the generation)."""
    name, _ = split_bucket(bucket)
    return {b.name: (b.generation, b.md5_hash) for b in gcs_client().list_blobs(name)}


def lines(path: str) -> list[bytes]:
    return as_path(path).read_bytes().splitlines() if as_path(path).exists() else []


def test_a_bucket_out_is_byte_identical_to_a_local_one(raw, tmp_path, bucket, gcs_emulator):
    def fault(index, body):
        return Fault("status", 503) if doc_of(body) == "beta" else None  # beta fails: a failed file

    local, remote = tmp_path / "docs.jsonl", f"{bucket}/runs/docs.jsonl"
    with ChatServer(faults=fault) as server:  # one server: its URL is part of the provenance
        assert annotate(server, raw, local, "--max-retries", "1") == 0
        assert annotate(server, raw, remote, "--max-retries", "1") == 0
    for suffix in SUFFIXES:
        assert as_path(remote + suffix).read_bytes() == (tmp_path / f"docs.jsonl{suffix}").read_bytes(), suffix
    assert len(lines(remote)) == 2 and len(lines(remote + ".failed.jsonl")) == 1
    assert sorted(gcs_emulator.objects(split_bucket(bucket)[0])) == sorted(  # no compose parts left
        f"runs/docs.jsonl{suffix}" for suffix in SUFFIXES)


def test_stopped_by_sigterm_and_resumed_in_the_bucket_equals_an_uninterrupted_run(tmp_path, bucket):
    n = 16
    raw = write_raw(tmp_path / "raw.jsonl", _many(n))
    whole, cut = tmp_path / "whole.jsonl", f"{bucket}/cut.jsonl"
    with ChatServer(latency=0.15) as server:
        assert annotate(server, raw, whole, "--concurrency", "2") == 0
        before = len(server.requests)
        process = _subprocess_annotate(server, raw, cut)  # inherits STORAGE_EMULATOR_HOST
        deadline = time.monotonic() + 60
        # The first requests are the first points of the documents in the window; the
        # second points follow, and about 4 documents are done at the 14th request.
        while len(server.requests) < before + 14:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "annotate requested too little in time"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 75, process.stderr.read().decode()
        finished = lines(cut)  # uploaded on SIGTERM, well before the 5-second interval
        assert 0 < len(finished) < n
        assert whole.read_bytes().splitlines()[:len(finished)] == finished  # a prefix, whole lines
        done = {f"doc-{i:02d}" for i in range(len(finished))}
        before = len(server.requests)
        resumed = _subprocess_annotate(server, raw, cut)
        assert resumed.wait(timeout=120) == 0, resumed.stderr.read().decode()
        again = {doc_of(b) for b in server.requests[before:]}
    assert not again & done, "a finished document was requested again"
    assert as_path(cut).read_bytes() == whole.read_bytes()


def test_refused_resumes_change_no_object(raw, bucket, capsys):
    out = f"{bucket}/docs.jsonl"
    with ChatServer() as server:
        assert annotate(server, raw, out) == 0
        objects = snapshot(bucket)
        capsys.readouterr()
        assert annotate(server, raw, out, "--where", "document") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {out} was annotated with other settings (" in err
        assert "where: 'passage' -> 'document'" in err
        assert snapshot(bucket) == objects
        assert annotate(server, raw, out) == 0  # the same settings: nothing left to do, nothing rewritten
        assert snapshot(bucket) == objects

        whole = as_path(out).read_bytes()
        as_path(out).write_bytes(whole[:-1])  # another writer left a last line without its newline
        objects = snapshot(bucket)
        capsys.readouterr()
        assert annotate(server, raw, out) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{out}:3: the last line is cut short" in err
        assert snapshot(bucket) == objects


def test_an_out_that_is_a_directory_in_the_bucket_is_refused(raw, bucket, capsys):
    as_path(f"{bucket}/runs/part-0.jsonl").write_text("{}\n")
    objects = snapshot(bucket)
    with ChatServer() as server:
        assert annotate(server, raw, f"{bucket}/runs") == 2
        assert server.requests == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {bucket}/runs is a directory" in err
    assert snapshot(bucket) == objects
