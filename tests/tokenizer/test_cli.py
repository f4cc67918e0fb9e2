"""`metatrain tokenizer train|extend|inspect` and `metatrain encode`, end to end on small files,
on local disk and in a bucket (`store`)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from metatrain import cli as metatrain_cli
from metatrain.cli.tokenizer import register
from metatrain.documents import read_documents
from metatrain.errors import UserError
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_CORPUS
from metatrain.io.storage import as_path
from metatrain.tokenizer import Encoder

from .conftest import TEST_VOCAB, make_corpus


def run(argv: list[str]) -> int:
    """Runs our subcommands the way `metatrain.cli.main` does, without the other parts' commands."""
    parser = argparse.ArgumentParser(prog="metatrain")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"metatrain {args.command}: error: {e}", file=sys.stderr)
        return 2


def test_train_inspect_extend(corpus_path, tmp_path, capsys):
    prefix = tmp_path / "tok" / "demo"
    assert run(["tokenizer", "train", "--input", str(corpus_path), "--input", str(corpus_path),
                "--vocab-size", "331", "--out", str(prefix)]) == 0
    assert "wrote" in capsys.readouterr().err
    model = tmp_path / "tok" / "demo.model"
    assert model.exists() and (tmp_path / "tok" / "demo.vocab").exists()

    assert run(["tokenizer", "inspect", "--tokenizer", str(model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vocab_size"] == 331
    assert set(info["tags"]) == {"<thinking>", "</thinking>", "<AI>", "</AI>", "<AI_quoting_human>",
                                 "</AI_quoting_human>", "<|good|>", "<|bad|>"}
    assert all(isinstance(v, int) for v in info["tags"].values())
    assert run(["tokenizer", "inspect", "--tokenizer", str(model)]) == 0
    assert "vocab size:       331" in capsys.readouterr().out

    tags = tmp_path / "my_tags.yaml"
    tags.write_text(DEFAULT_TAGS.read_text().replace('  bad: "<|bad|>"', '  bad: "<|bad|>"\n  toxic: "<|toxic|>"'))
    out = tmp_path / "extended.model"
    assert run(["tokenizer", "extend", "--base", str(model), "--tags", str(tags), "--out", str(out)]) == 0
    assert "added: <|toxic|>=331" in capsys.readouterr().err
    assert run(["tokenizer", "inspect", "--tokenizer", str(out), "--tags", str(tags), "--json"]) == 0
    extended = json.loads(capsys.readouterr().out)
    assert extended["vocab_size"] == 332 and extended["tags"]["<|toxic|>"] == 331
    assert {k: v for k, v in extended["tags"].items() if k != "<|toxic|>"} == info["tags"]


BAD_RECORDS = [
    "{not json",
    json.dumps({"id": "no-segments"}),
    json.dumps({"id": "segments-not-list", "segments": "hello"}),
    json.dumps({"id": "unknown-kind", "segments": [{"kind": "poem", "text": "a"}]}),
    json.dumps({"id": "text-not-string", "segments": [{"kind": "text", "text": 42}]}),
    b'{"id": "latin1", "segments": [{"kind": "text", "text": "caf\xe9"}]}',
    json.dumps({"id": "jump", "segments": [{"kind": "text", "text": "a", "mode": "ai_quoting_human"}]}),
]


def _mixed_input(tmp_path):
    good = make_corpus(8, seed=9)
    path = tmp_path / "mixed.jsonl"
    with open(path, "wb") as f:
        for i, doc in enumerate(good):
            f.write(json.dumps(doc).encode() + b"\n")
            if i < len(BAD_RECORDS):
                bad = BAD_RECORDS[i]
                f.write((bad if isinstance(bad, bytes) else bad.encode()) + b"\n")
    return path, good


def test_encode_skips_every_kind_of_bad_record_and_keeps_the_good_ones(model_path, tmp_path, capsys):
    path, good = _mixed_input(tmp_path)
    out = tmp_path / "out" / "encoded.jsonl"
    assert run(["encode", "--tokenizer", str(model_path), "--input", str(path), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped 7 bad records" in err and "wrote 8 documents" in err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == [d["id"] for d in good]
    encoder = Encoder.from_files(model_path)
    docs = [d for d in read_documents(path) if d.id != "jump"]  # structurally valid, illegal transition
    assert len(docs) == len(lines)
    for record, doc in zip(lines, docs):
        encoded = encoder.encode(doc)
        assert record["ids"] == encoded.ids.tolist()
        assert len(record["roles"]) == len(record["ids"])
        assert set(record["roles"]) <= {"text", "thinking", "mantra", "tag"}
        assert record["roles"].count("mantra") == len(encoder.mantra_ids) * sum(
            s.kind == "thinking" for s in doc.segments)


def test_encode_reports_where_each_bad_record_is(model_path, tmp_path, caplog):
    path, _ = _mixed_input(tmp_path)
    run(["encode", "--tokenizer", str(model_path), "--input", str(path), "--output", str(tmp_path / "o.jsonl")])
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{path}:2: invalid JSON" in m for m in messages)
    assert any(f"{path}:12: invalid UTF-8" in m for m in messages)
    assert any(f"{path}:14 (document 'jump'): segment 0 (text): no tag moves directly from mode human "
               "to mode ai_quoting_human" in m for m in messages)


def test_encode_strict_stops_with_an_error_and_writes_nothing(model_path, tmp_path, capsys):
    path, _ = _mixed_input(tmp_path)
    out = tmp_path / "encoded.jsonl"
    assert run(["encode", "--tokenizer", str(model_path), "--input", str(path), "--output", str(out),
                "--strict"]) == 2
    assert f"{path}:2: invalid JSON" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [path]


def test_encode_mantra_policy_none(model_path, corpus_path, tmp_path):
    out = tmp_path / "o.jsonl"
    assert run(["encode", "--tokenizer", str(model_path), "--input", str(corpus_path), "--output", str(out),
                "--mantra-policy", "none"]) == 0
    assert all("mantra" not in json.loads(line)["roles"] for line in out.read_text().splitlines())


def test_encode_refuses_a_bad_tokenizer(tmp_path, corpus_path, capsys):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00\x01 not a model")
    assert run(["encode", "--tokenizer", str(junk), "--input", str(corpus_path),
                "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "is not a SentencePiece model" in capsys.readouterr().err


def test_the_metatrain_command_has_our_subcommands(model_path, capsys):
    assert metatrain_cli.main(["tokenizer", "inspect", "--tokenizer", str(model_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 331
    with pytest.raises(SystemExit):
        metatrain_cli.main(["encode", "--help"])
    assert "--mantra-policy" in capsys.readouterr().out


# -- inputs and outputs in a store: local disk or a bucket (the GCS emulator) -------------

CLI = "import sys; from metatrain.cli import main; sys.exit(main())"  # `metatrain ARGS...`
#: A small vocabulary for the sample corpus (its characters alone take 340 pieces with the specials).
SAMPLE_VOCAB = 512


def shards(store) -> list[str]:
    """`--input` arguments for the two shards: the glob `shards/*.jsonl`, which metatrain expands
    in a bucket (no shell can), or on local disk the files a shell expands it into."""
    names = ["shards/*.jsonl"] if store.is_bucket else ["shards/a.jsonl", "shards/b.jsonl"]
    return [arg for name in names for arg in ("--input", f"{store}/{name}")]


def test_encode_reads_the_shards_in_a_store_and_writes_its_output_there(stored_inputs, model_path, corpus_path,
                                                                         tmp_path):
    store = stored_inputs
    want = tmp_path / "local.jsonl"
    assert metatrain_cli.main(["encode", "--tokenizer", str(model_path), "--input", str(corpus_path),
                               "--output", str(want)]) == 0
    done = subprocess.run(
        [sys.executable, "-c", CLI, "encode", "--tokenizer", f"{store}/tok.model", "--tags", f"{store}/tags.yaml",
         *shards(store), "--output", f"{store}/out/encoded.jsonl"],
        capture_output=True, text=True, env=store.env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert as_path(f"{store}/out/encoded.jsonl").read_bytes() == want.read_bytes()


@pytest.mark.bucket
def test_encode_says_a_remote_glob_that_matches_no_file_in_one_line(bucket_store, model_path, tmp_path):
    store = bucket_store
    missing = subprocess.run(
        [sys.executable, "-c", CLI, "encode", "--tokenizer", str(model_path), "--input", f"{store}/none/*.jsonl",
         "--output", str(tmp_path / "o.jsonl")], capture_output=True, text=True, env=store.env(), timeout=120)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert f"input {store}/none/*.jsonl: the pattern matches no file" in missing.stderr


def test_tokenizer_train_reads_inputs_in_a_store(stored_inputs, corpus_path, tmp_path):
    store = stored_inputs
    assert metatrain_cli.main(["tokenizer", "train", "--input", str(corpus_path), "--vocab-size", str(TEST_VOCAB),
                               "--out", str(tmp_path / "local" / "tok")]) == 0
    assert metatrain_cli.main(["tokenizer", "train", *shards(store), "--vocab-size",
                               str(TEST_VOCAB), "--tags", f"{store}/tags.yaml", "--out", str(tmp_path / "remote" / "tok")]) == 0
    assert (tmp_path / "remote" / "tok.model").read_bytes() == (tmp_path / "local" / "tok.model").read_bytes()


def _train(out: str) -> int:
    return metatrain_cli.main(["tokenizer", "train", "--input", str(SAMPLE_CORPUS), "--vocab-size", str(SAMPLE_VOCAB),
                               "--out", out])


def test_tokenizer_train_to_a_prefix_in_a_store_writes_the_local_bytes(store, tmp_path, capsys):
    assert _train(str(tmp_path / "tok" / "v1")) == 0
    assert _train(f"{store}/tok/v1") == 0
    assert f"wrote {store}/tok/v1.model (" in capsys.readouterr().err
    assert store.files() == ["tok/v1.model", "tok/v1.vocab"]  # no scratch left behind
    for suffix in (".model", ".vocab"):
        assert as_path(f"{store}/tok/v1{suffix}").read_bytes() == (tmp_path / "tok" / f"v1{suffix}").read_bytes()
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["v1.model", "v1.vocab"]
