"""`metatrain tokenizer train` and `tokenizer extend` writing into a bucket (`gs://`,
against the GCS emulator) give the same bytes as the same commands writing local files,
and leave nothing else in the bucket."""

from __future__ import annotations

import pytest

from metatrain.cli import main
from metatrain.errors import UserError
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_CORPUS
from metatrain.io.storage import as_path
from metatrain.tokenizer import extend_tokenizer, load_registry, train_tokenizer

from .conftest import TEST_VOCAB

#: A small vocabulary for the sample corpus (its characters alone take 340 pieces with the specials).
SAMPLE_VOCAB = 512
NEW_TAG = '  toxic: "<|toxic|>"\n'
ANCHOR = '  bad: "<|bad|>"\n'


def _train(out: str) -> int:
    return main(["tokenizer", "train", "--input", str(SAMPLE_CORPUS), "--vocab-size", str(SAMPLE_VOCAB), "--out", out])


def test_tokenizer_train_to_a_bucket_prefix_writes_the_local_bytes(bucket, gcs_emulator, tmp_path, capsys):
    assert _train(str(tmp_path / "tok" / "v1")) == 0
    assert _train(f"{bucket}/tok/v1") == 0
    assert f"wrote {bucket}/tok/v1.model (" in capsys.readouterr().err
    name = bucket.removeprefix("gs://")
    assert sorted(gcs_emulator.objects(name)) == ["tok/v1.model", "tok/v1.vocab"]  # no scratch left behind
    for suffix in (".model", ".vocab"):
        assert as_path(f"{bucket}/tok/v1{suffix}").read_bytes() == (tmp_path / "tok" / f"v1{suffix}").read_bytes()
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["v1.model", "v1.vocab"]


def test_tokenizer_train_refuses_a_bucket_output_that_is_a_directory(bucket, gcs_emulator):
    as_path(f"{bucket}/tok/v1.model/keep.txt").write_text("mine")
    with pytest.raises(UserError, match=f"--out {bucket}/tok/v1.model is a directory"):
        train_tokenizer([SAMPLE_CORPUS], vocab_size=SAMPLE_VOCAB, out_prefix=f"{bucket}/tok/v1")
    assert gcs_emulator.objects(bucket.removeprefix("gs://")) == ["tok/v1.model/keep.txt"]


def test_tokenizer_extend_to_a_bucket_writes_the_local_bytes(bucket, model_path, tmp_path):
    tags = tmp_path / "tags.yaml"
    tags.write_text(DEFAULT_TAGS.read_text().replace(ANCHOR, ANCHOR + NEW_TAG))
    local = extend_tokenizer(model_path, load_registry(tags), tmp_path / "ext.model")
    assert local.added == {"<|toxic|>": TEST_VOCAB}

    as_path(f"{bucket}/base.model").write_bytes(model_path.read_bytes())  # a base in the bucket, too
    as_path(f"{bucket}/tags.yaml").write_bytes(tags.read_bytes())
    assert main(["tokenizer", "extend", "--base", f"{bucket}/base.model", "--tags", f"{bucket}/tags.yaml",
                 "--out", f"{bucket}/ext.model"]) == 0
    assert as_path(f"{bucket}/ext.model").read_bytes() == (tmp_path / "ext.model").read_bytes()
    again = extend_tokenizer(f"{bucket}/ext.model", load_registry(tags), f"{bucket}/again.model")
    assert again.added == {} and str(again.out_path) == f"{bucket}/again.model"
    assert as_path(f"{bucket}/again.model").read_bytes() == (tmp_path / "ext.model").read_bytes()
