"""Tokenizers, tag registries and the inputs of `encode` and `tokenizer train` in a bucket
(`gs://`, against the GCS emulator) give what the same local files give."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from metatrain.cli import main
from metatrain.documents import read_documents
from metatrain.errors import UserError
from metatrain.io.paths import DEFAULT_TAGS
from metatrain.io.storage import as_path
from metatrain.tokenizer import Encoder, load_registry

from .conftest import TEST_VOCAB, make_corpus, write_jsonl

CLI = "import sys; from metatrain.cli import main; sys.exit(main())"  # `metatrain ARGS...`


@pytest.fixture
def remote(bucket, model_path, corpus_path):
    """The test tokenizer, the shipped tags and the corpus (whole, and in two shards) in `bucket`."""
    as_path(f"{bucket}/tok.model").write_bytes(model_path.read_bytes())
    as_path(f"{bucket}/tags.yaml").write_bytes(DEFAULT_TAGS.read_bytes())
    as_path(f"{bucket}/docs.jsonl").write_bytes(corpus_path.read_bytes())
    lines = corpus_path.read_bytes().splitlines(keepends=True)
    as_path(f"{bucket}/shards/a.jsonl").write_bytes(b"".join(lines[:120]))
    as_path(f"{bucket}/shards/b.jsonl").write_bytes(b"".join(lines[120:]))
    return bucket


def test_a_remote_tokenizer_and_tags_encode_like_the_local_ones(remote, model_path, corpus_path):
    local = Encoder.from_files(model_path, DEFAULT_TAGS)
    loaded = Encoder.from_files(f"{remote}/tok.model", f"{remote}/tags.yaml")
    registry = load_registry(f"{remote}/tags.yaml")
    assert registry.source == f"{remote}/tags.yaml"
    assert dataclasses.replace(registry, source="") == dataclasses.replace(load_registry(DEFAULT_TAGS), source="")
    for doc in list(read_documents(corpus_path))[:20]:
        a, b = local.encode(doc), loaded.encode(doc)
        assert a.ids.tolist() == b.ids.tolist() and a.roles.tolist() == b.roles.tolist()


def test_a_missing_remote_tokenizer_or_tags_is_one_line_naming_the_url(bucket, model_path):
    with pytest.raises(UserError, match=f"^cannot read tokenizer {bucket}/missing.model: No such file or directory$"):
        Encoder.from_files(f"{bucket}/missing.model", DEFAULT_TAGS)
    with pytest.raises(UserError, match=f"^cannot read tag registry {bucket}/tags.yaml: No such file or directory$"):
        Encoder.from_files(model_path, f"{bucket}/tags.yaml")


def test_encode_reads_a_remote_glob_and_writes_a_remote_output(remote, model_path, corpus_path, tmp_path, gcs_emulator):
    want = tmp_path / "local.jsonl"
    assert main(["encode", "--tokenizer", str(model_path), "--input", str(corpus_path), "--output", str(want)]) == 0
    done = subprocess.run(
        [sys.executable, "-c", CLI, "encode", "--tokenizer", f"{remote}/tok.model", "--tags", f"{remote}/tags.yaml",
         "--input", f"{remote}/shards/*.jsonl", "--output", f"{remote}/out/encoded.jsonl"],
        capture_output=True, text=True, env=gcs_emulator.env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert as_path(f"{remote}/out/encoded.jsonl").read_bytes() == want.read_bytes()
    missing = subprocess.run(
        [sys.executable, "-c", CLI, "encode", "--tokenizer", str(model_path), "--input", f"{remote}/none/*.jsonl",
         "--output", str(tmp_path / "o.jsonl")], capture_output=True, text=True, env=gcs_emulator.env(), timeout=120)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert f"input {remote}/none/*.jsonl: the pattern matches no file" in missing.stderr


def test_tokenizer_train_reads_remote_inputs(remote, corpus_path, tmp_path):
    assert main(["tokenizer", "train", "--input", str(corpus_path), "--vocab-size", str(TEST_VOCAB),
                 "--out", str(tmp_path / "local" / "tok")]) == 0
    assert main(["tokenizer", "train", "--input", f"{remote}/shards/*.jsonl", "--vocab-size", str(TEST_VOCAB),
                 "--tags", f"{remote}/tags.yaml", "--out", str(tmp_path / "remote" / "tok")]) == 0
    assert (tmp_path / "remote" / "tok.model").read_bytes() == (tmp_path / "local" / "tok.model").read_bytes()


def test_read_documents_of_a_remote_file_equals_the_local_file(bucket, tmp_path):
    docs = make_corpus(12, seed=4)
    write_jsonl(tmp_path / "d.jsonl", [docs[0], "{broken", *docs[1:]])
    as_path(f"{bucket}/d.jsonl").write_bytes((tmp_path / "d.jsonl").read_bytes())
    assert list(read_documents(f"{bucket}/d.jsonl")) == list(read_documents(tmp_path / "d.jsonl"))
