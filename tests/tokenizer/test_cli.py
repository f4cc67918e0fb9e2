"""`metatrain tokenizer train|extend|inspect` and `metatrain encode`, end to end on small files."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from metatrain import cli as metatrain_cli
from metatrain.cli.tokenizer import register
from metatrain.documents import read_documents
from metatrain.errors import UserError
from metatrain.io.paths import DEFAULT_TAGS
from metatrain.tokenizer import Encoder

from .conftest import make_corpus


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
