"""Known-answer corpora (`metatrain data synthetic`): the four files, their determinism, the
teacher's exactness (answers recomputed here from the question text), the control's empty
thoughts, the held-out split, the token budget, and agreement with annotate's placement."""

from __future__ import annotations

import json
import re

import pytest

from metatrain.annotate.inputs import read_raw_documents
from metatrain.annotate.placement import PlacementConfig, plan_insertions
from metatrain.cli import main
from metatrain.data.synthetic import TASKS, corpus_paths, thought_answers
from metatrain.documents import parse_document
from metatrain.tokenizer.mantra import DEFAULT_MANTRA

FILES = ("x.jsonl", "x.raw.jsonl", "x.heldout.jsonl", "x.heldout.raw.jsonl")
_QUESTION = re.compile(
    r"Let (\w) be (\d) and (\w) be (\d)\. Let (\w) be (\w) (plus|minus|times) (\w), and (\w) be (\w) (plus|minus|times) (\w)\."
)
_ANSWER = re.compile(r"So (\w) is (\d)\.")


def _synthetic(out, task="chain", documents=60, *more) -> int:
    return main(["data", "synthetic", "--task", task, "--documents", str(documents), "--out", str(out), *more])


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="ascii").splitlines()]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """`{task: directory}`: each task written with 60 training and 50 held-out documents, seed 0."""
    out = {}
    for task in TASKS:
        directory = tmp_path_factory.mktemp(task)
        assert _synthetic(directory / "x.jsonl", task) == 0
        out[task] = directory
    return out


def _solve(question: str) -> tuple[str, int, str, int]:
    """(intermediate variable, its value, answer variable, its value), computed from the words."""
    m = _QUESTION.fullmatch(question)
    assert m, question
    a, va, b, vb, c, x, op1, y, d, z, op2, w = m.groups()
    values = {a: int(va), b: int(vb)}

    def value(token: str) -> int:
        return int(token) if token.isdigit() else values[token]

    def apply(op: str, p: int, q: int) -> int:
        return {"plus": p + q, "minus": p - q, "times": p * q}[op] % 10

    assert z == c and len({a, b, c, d}) == 4
    values[c] = apply(op1, value(x), value(y))
    values[d] = apply(op2, values[c], value(w))
    return c, values[c], d, values[d]


def test_four_files_of_plain_ascii(corpora):
    directory = corpora["chain"]
    assert sorted(p.name for p in directory.iterdir()) == sorted(FILES)
    for name in FILES:
        data = (directory / name).read_bytes()
        assert data.isascii() and data.endswith(b"\n")
    assert len(_records(directory / "x.jsonl")) == 60
    assert len(_records(directory / "x.heldout.jsonl")) == 50  # default: a tenth, at least 50


def test_same_seed_same_bytes_another_seed_other_bytes(corpora, tmp_path, capsys):
    assert _synthetic(tmp_path / "same" / "x.jsonl") == 0
    out = capsys.readouterr().out
    assert "(60 documents, 120 problems)" in out and "(50 held-out documents): task chain, seed 0" in out
    for name in FILES:
        assert (tmp_path / "same" / name).read_bytes() == (corpora["chain"] / name).read_bytes()
    assert _synthetic(tmp_path / "other" / "x.jsonl", "chain", 60, "--seed", "1") == 0
    for name in FILES:
        assert (tmp_path / "other" / name).read_bytes() != (corpora["chain"] / name).read_bytes()
    # --heldout changes only the held-out split, whose first documents stay the same.
    assert _synthetic(tmp_path / "fewer" / "x.jsonl", "chain", 60, "--heldout", "7") == 0
    assert (tmp_path / "fewer" / "x.jsonl").read_bytes() == (corpora["chain"] / "x.jsonl").read_bytes()
    assert _records(tmp_path / "fewer" / "x.heldout.jsonl") == _records(corpora["chain"] / "x.heldout.jsonl")[:7]


def test_teacher_corpus_parses_and_its_text_is_the_raw_text(corpora):
    for task, directory in corpora.items():
        for teacher, raw in (("x.jsonl", "x.raw.jsonl"), ("x.heldout.jsonl", "x.heldout.raw.jsonl")):
            annotated, plain = _records(directory / teacher), _records(directory / raw)
            assert [r["id"] for r in annotated] == [r["id"] for r in plain]
            for line, (record, raw_record) in enumerate(zip(annotated, plain), 1):
                doc = parse_document(record, path=teacher, line=line)
                assert "".join(s.text for s in doc.segments if s.kind == "text") == raw_record["text"]
                assert record["known"] == raw_record["known"] and record["task"] == raw_record["task"] == task
                thinking = [s for s in doc.segments if s.kind == "thinking"]
                assert len(thinking) == len(record["known"]) >= 2


def test_chain_teacher_answers_are_correct_and_the_thought_states_the_intermediate(corpora):
    checked = 0
    for name in ("x.jsonl", "x.heldout.jsonl"):
        for record in _records(corpora["chain"] / name):
            text = "".join(s["text"] for s in record["segments"] if s["kind"] == "text")
            paragraphs = text.split("\n\n")
            thoughts = [s["text"] for s in record["segments"] if s["kind"] == "thinking"]
            assert len(paragraphs) == 2 * len(thoughts) == 2 * len(record["known"])
            for k, point in enumerate(record["known"]):
                question, answer = paragraphs[2 * k], paragraphs[2 * k + 1]
                c, vc, d, vd = _solve(question)
                assert _ANSWER.fullmatch(answer).groups() == (d, str(vd))
                assert point["answer"] == f"{d} is {vd}"
                assert text[point["at"]:].startswith(answer) and point["answer"] in answer
                assert thoughts[k] == f"{c} is {vc}, so {d} is {vd}."
                checked += 1
    assert checked == 2 * (60 + 50)


def test_control_has_the_same_raw_documents_and_thoughts_that_carry_nothing(corpora):
    for name in ("x.raw.jsonl", "x.heldout.raw.jsonl"):
        chain, control = _records(corpora["chain"] / name), _records(corpora["chain-control"] / name)
        assert [(r["id"], r["text"], r["known"]) for r in chain] == [(r["id"], r["text"], r["known"]) for r in control]
    for record in _records(corpora["chain-control"] / "x.jsonl"):
        for s in record["segments"]:
            if s["kind"] == "thinking":
                assert re.fullmatch(r"Let me work out \w\.", s["text"]), s["text"]


def test_thought_answers_counts_all_for_the_teacher_none_for_the_control_and_raw(corpora):
    def totals(path):
        counts = [thought_answers(r) for r in _records(path)]
        return sum(c for c, _ in counts), sum(t for _, t in counts)

    for split in ("x", "x.heldout"):
        carried, total = totals(corpora["chain"] / f"{split}.jsonl")
        assert total == carried > 0
        assert totals(corpora["chain-control"] / f"{split}.jsonl") == (0, total)
        assert totals(corpora["chain"] / f"{split}.raw.jsonl") == (0, total)
    # A thought one paragraph too late carries nothing: the offset matters, not only the text.
    record = _records(corpora["chain"] / "x.jsonl")[0]
    moved = dict(record, known=[dict(p, at=p["at"] + 1) for p in record["known"]])
    assert thought_answers(moved) == (0, len(record["known"]))


def test_heldout_is_disjoint_from_training(corpora):
    directory = corpora["chain"]
    train, held = _records(directory / "x.raw.jsonl"), _records(directory / "x.heldout.raw.jsonl")
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    questions = lambda records: {p for r in records for p in r["text"].split("\n\n") if p.startswith("Let ")}  # noqa: E731
    assert questions(held) and not questions(train) & questions(held)


def test_documents_with_thoughts_and_mantra_fit_256_tokens(corpora, encoder):
    assert encoder.mantra == DEFAULT_MANTRA and encoder.mantra_policy == "every"
    lengths = [len(encoder.encode(parse_document(r, path="x.jsonl", line=i)))
               for i, r in enumerate(_records(corpora["chain"] / "x.jsonl"), 1)]
    assert sum(n <= 256 for n in lengths) >= 0.9 * len(lengths)


def test_known_points_are_annotate_passage_paragraph_points(corpora):
    config = PlacementConfig(where="passage", split="paragraph")
    path = corpora["chain"] / "x.raw.jsonl"
    records = {r["id"]: r for r in _records(path)}
    seen = 0
    for doc in read_raw_documents([path], strict=True):
        (segment,) = doc.segments
        offsets = {p.offset for p in plan_insertions(doc, config)}
        known = {p["at"] for p in records[doc.id]["known"]}
        assert known <= offsets and all(0 < at < len(segment.text) for at in known)
        seen += 1
    assert seen == len(records)


def test_bad_options_are_one_line_and_nothing_is_overwritten(corpora, tmp_path, capsys):
    existing = corpora["chain"] / "x.jsonl"
    before = {name: (corpora["chain"] / name).read_bytes() for name in FILES}
    capsys.readouterr()
    cases = [
        (["--task", "chain", "--out", str(existing)], "exists; choose another --out, or pass --force"),
        (["--task", "chain", "--out", str(tmp_path / "x.json")], "must name a .jsonl file"),
        (["--task", "chain", "--out", str(tmp_path / "x.raw.jsonl")], "must name a .jsonl file"),
        (["--task", "sums", "--out", str(tmp_path / "y.jsonl")], "--task 'sums' is not a known task; choose one of chain"),
    ]
    for words, expected in cases:
        assert main(["data", "synthetic", "--documents", "3", *words]) == 2
        (line,) = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
        assert line.startswith("metatrain data: error: ") and expected in line, line
    assert {name: (corpora["chain"] / name).read_bytes() for name in FILES} == before
    assert not list(tmp_path.iterdir())
    # Only the raw file of another corpus exists: still refused, and left alone.
    (tmp_path / "z.raw.jsonl").write_text("mine\n")
    assert _synthetic(tmp_path / "z.jsonl") == 2
    assert (tmp_path / "z.raw.jsonl").read_text() == "mine\n" and not (tmp_path / "z.jsonl").exists()
    # --force replaces them.
    assert _synthetic(tmp_path / "z.jsonl", "chain", 60, "--force") == 0
    assert (tmp_path / "z.raw.jsonl").read_bytes() == before["x.raw.jsonl"]


def test_corpus_paths_puts_the_four_files_beside_out(tmp_path):
    paths = corpus_paths(tmp_path / "d" / "c.jsonl")
    assert [p.name for p in paths.values()] == ["c.jsonl", "c.raw.jsonl", "c.heldout.jsonl", "c.heldout.raw.jsonl"]
    assert {p.parent for p in paths.values()} == {tmp_path / "d"}
