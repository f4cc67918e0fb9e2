"""Documents read from a bucket (`gs://`, against the GCS emulator) by `read_documents` and by
`metatrain annotate`'s input reader equal those of the same local files; bad remote inputs
are one line naming the URL."""

from __future__ import annotations

import gzip
import json

import pytest

from metatrain.annotate.inputs import expand_inputs, read_raw_documents
from metatrain.documents import read_documents
from metatrain.errors import UserError
from metatrain.io.formats import RecordError
from metatrain.io.storage import as_path

DOCS = [{"id": f"d{i}", "segments": [{"kind": "text", "text": f"Document {i} says something."}]} for i in range(9)]


@pytest.fixture
def both(bucket, tmp_path):
    """The same inputs (a directory of JSON Lines, compressed JSON Lines and text) locally and in `bucket`."""
    files = {
        "docs/a.jsonl": "\n".join(json.dumps(d) for d in DOCS[:4]).encode() + b"\n",
        "docs/b.jsonl.gz": gzip.compress(("\n".join(json.dumps(d) for d in DOCS[4:]) + "\n").encode()),
        "docs/notes.txt": "A whole file is one document.\n".encode(),
    }
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
        as_path(f"{bucket}/{name}").write_bytes(data)
    return tmp_path, bucket


@pytest.mark.parametrize("given", ["docs", "docs/*.jsonl*", "docs/b.jsonl.gz"])
def test_annotate_inputs_in_a_bucket_read_like_the_local_files(both, given):
    local, remote = both
    local_files, remote_files = expand_inputs(f"{local}/{given}"), expand_inputs(f"{remote}/{given}")
    assert [str(f)[len(remote):] for f in remote_files] == [str(f)[len(str(local)):] for f in local_files]
    want = list(read_raw_documents(f"{local}/{given}"))
    got = list(read_raw_documents(f"{remote}/{given}"))
    assert want and got == want and all(d.path.startswith(f"{remote}/docs/") for d in got)


def test_read_documents_expands_a_remote_glob(both):
    local, remote = both
    want = list(read_documents([local / "docs" / "a.jsonl", local / "docs" / "b.jsonl.gz"]))
    assert len(want) == len(DOCS) and list(read_documents(f"{remote}/docs/*.jsonl*")) == want


def test_bad_remote_inputs_are_one_line_naming_the_url(bucket):
    for given, message in ((f"{bucket}/none/*.jsonl", "the pattern matches no file"),
                           (f"{bucket}/missing.jsonl", "no such file or directory")):
        with pytest.raises(UserError, match=message) as raised:
            expand_inputs(given)
        assert str(raised.value) == f"input {given}: {message}"
    with pytest.raises(UserError, match=f"^input {bucket}/none/\\*.jsonl: the pattern matches no file$"):
        list(read_documents(f"{bucket}/none/*.jsonl"))
    with pytest.raises(RecordError, match="cannot open: No such file or directory") as raised:
        list(read_documents(f"{bucket}/missing.jsonl"))
    assert raised.value.path == f"{bucket}/missing.jsonl" and "\n" not in str(raised.value)
