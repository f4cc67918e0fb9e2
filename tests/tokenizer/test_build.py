"""`metatrain tokenizer train|extend` as a user runs them, against hostile tags and
interrupts: an output is replaced only once the new model is checked, a refusal is one
line, and nothing half-written or temporary survives (issue 25)."""

from __future__ import annotations

import json
import random
import signal
import string
import subprocess
import sys
import time

import pytest

from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_CORPUS

from ..conftest import error_lines, run_cli

ANCHOR = '  bad: "<|bad|>"\n'
#: A vocabulary the sample corpus can fill.
SAMPLE_VOCAB = 512


def tags_with(tmp_path, tag_yaml: str, name: str = "tags.yaml"):
    """The shipped tag registry plus a control `extra` whose tag is `tag_yaml` (YAML text)."""
    path = tmp_path / name
    path.write_text(DEFAULT_TAGS.read_text().replace(ANCHOR, ANCHOR + f"  extra: {tag_yaml}\n"))
    return path


def plant_old_outputs(*paths) -> dict:
    """Put recognisable old contents at `paths`; returns what each must still hold."""
    for path in paths:
        path.write_bytes(b"old " + path.name.encode())
    return {path: path.read_bytes() for path in paths}


def assert_one_line(done, *words: str) -> None:
    lines = error_lines(done.stderr)
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], lines[0]


#: A tag SentencePiece cannot hold (its model loader refuses a piece with a NUL in it).
NUL_TAG = '"<|to\\0xic|>"'


@pytest.mark.hostile
def test_extend_refuses_a_nul_in_a_tag_in_one_line_and_keeps_the_old_output(model_path, tmp_path):
    tags = tags_with(tmp_path, NUL_TAG)
    out = tmp_path / "new.model"
    old = plant_old_outputs(out)
    done = run_cli("tokenizer", "extend", "--base", str(model_path), "--tags", str(tags), "--out", str(out))
    assert_one_line(done, str(tags), "U+0000")
    assert {p: p.read_bytes() for p in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.model", "tags.yaml"]


@pytest.mark.hostile
def test_extend_writes_nothing_when_the_extended_model_would_not_load(tmp_path):
    """A base without BOS/EOS gains its tags, but no tokenizer metatrain can use comes of
    it: --out must keep what it held."""
    import sentencepiece as spm

    base = tmp_path / "nobos.model"
    lines = [f"word{i % 37} other{i % 11} thing{i % 5}" for i in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "nobos"),
                                   vocab_size=25, bos_id=-1, eos_id=-1, minloglevel=2)
    out = tmp_path / "new.model"
    old = plant_old_outputs(out)
    done = run_cli("tokenizer", "extend", "--base", str(base), "--out", str(out))
    assert_one_line(done, "no BOS or EOS", f"--out {out} was not written")
    assert {p: p.read_bytes() for p in old} == old


@pytest.mark.hostile
def test_train_refuses_a_nul_in_a_tag_before_replacing_model_or_vocab(tmp_path):
    tags = tags_with(tmp_path, NUL_TAG)
    old = plant_old_outputs(tmp_path / "tok.model", tmp_path / "tok.vocab")
    done = run_cli("tokenizer", "train", "--input", str(SAMPLE_CORPUS), "--vocab-size", str(SAMPLE_VOCAB),
                   "--tags", str(tags), "--out", str(tmp_path / "tok"))
    assert_one_line(done, str(tags), "U+0000")
    assert {p: p.read_bytes() for p in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tags.yaml", "tok.model", "tok.vocab"]


@pytest.mark.hostile
@pytest.mark.parametrize("command", ["train", "extend", "inspect", "encode"])
def test_a_lone_surrogate_tag_is_refused_in_one_line(model_path, tmp_path, command):
    tags = tags_with(tmp_path, '"<|\\ud800|>"')
    args = {
        "train": ["tokenizer", "train", "--input", str(SAMPLE_CORPUS), "--vocab-size", str(SAMPLE_VOCAB),
                  "--out", str(tmp_path / "tok")],
        "extend": ["tokenizer", "extend", "--base", str(model_path), "--out", str(tmp_path / "new.model")],
        "inspect": ["tokenizer", "inspect", "--tokenizer", str(model_path)],
        "encode": ["encode", "--tokenizer", str(model_path), "--input", str(SAMPLE_CORPUS),
                   "--output", str(tmp_path / "out.jsonl")],
    }[command]
    done = run_cli(*args, "--tags", str(tags))
    assert_one_line(done, str(tags), "'<|\\ud800|>'", "U+D800", "surrogate")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tags.yaml"]


# -- interrupts: Ctrl-C and SIGTERM at the two moments that matter ------------------------


def _wait_for(predicate, process, limit: float = 120.0) -> bool:
    start = time.monotonic()
    while time.monotonic() - start < limit and process.poll() is None:
        if predicate():
            return True
        time.sleep(0.002)
    return False


@pytest.mark.hostile
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_train_leaves_the_old_outputs_and_no_temporary(tmp_path, signum):
    """The signal arrives once the scratch directory exists, while SentencePiece trains
    (a corpus large enough to take a while): the command is not done, so it must end with
    the old `.model` and `.vocab` in place and nothing else beside them."""
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(5000)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "segments": [{"kind": "text", "text": " ".join(
        rng.choices(words, k=60))}]}) + "\n" for i in range(20000)))
    out = tmp_path / "out"
    out.mkdir()
    old = plant_old_outputs(out / "tok.model", out / "tok.vocab")
    process = subprocess.Popen(
        [sys.executable, "-m", "metatrain.cli", "tokenizer", "train", "--input", str(corpus),
         "--vocab-size", "2000", "--out", str(out / "tok")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        training = _wait_for(lambda: any(out.glob(".tok.*.partial")), process)
        assert training, "the trainer never made its scratch directory"
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum], stderr
    assert "Traceback" not in stderr
    assert {p: p.read_bytes() for p in old} == old
    assert sorted(p.name for p in out.iterdir()) == ["tok.model", "tok.vocab"]
