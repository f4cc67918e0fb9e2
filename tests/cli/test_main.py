"""The `metatrain` command's own promises: one line whatever a message quotes, and
SIGTERM or Ctrl-C outside training unwinds so that nothing half-written is left."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from metatrain.errors import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    MAX_MESSAGE_CHARS,
    one_line,
)
from metatrain.io.paths import REPO_ROOT

from ..conftest import error_lines, run_cli


def test_one_line_escapes_control_characters_and_keeps_the_rest():
    assert one_line("plain words, ünïcode") == "plain words, ünïcode"
    assert one_line("a\nb\x1b[31mc\ud800") == "a\\nb\\x1b[31mc\\ud800"
    # an indented list (a refused resume's changed keys) stays one item per line
    assert one_line("cannot resume:\n  a: 1 -> 2\n  fix: b") == "cannot resume:\n  a: 1 -> 2\n  fix: b"


def test_one_line_cuts_the_middle_of_a_long_message_and_says_how_much():
    message = "start " + "x" * 10_000_000 + " end"
    cut = one_line(message)
    assert len(cut) < MAX_MESSAGE_CHARS + 100
    assert cut.startswith("start ") and cut.endswith(" end") and "characters cut" in cut


@pytest.mark.hostile
def test_a_message_quoting_a_newline_and_an_escape_sequence_stays_one_line(tmp_path):
    hostile = str(tmp_path / "a\nmetatrain train: done\x1b[2J.yaml")
    done = run_cli("train", "--config", hostile, "--workdir", str(tmp_path / "run"))
    assert done.returncode == 2
    (line,) = error_lines(done.stderr)
    assert line.startswith("metatrain train: error: config file ") and "\\nmetatrain train: done\\x1b[2J" in line


def _encode_until_signalled(tmp_path, sig: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Start `tokenizer encode` on a corpus large enough to take a while, signal it once
    it has begun writing, and return its result and what is left beside the output."""
    docs = tmp_path / "docs.jsonl"
    with open(docs, "w") as f:
        f.writelines(json.dumps({"id": str(i), "text": f"document {i} " * 40}) + "\n" for i in range(200_000))
    out = tmp_path / "out" / "ids.jsonl"
    out.parent.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "metatrain.cli", "encode", "--tokenizer",
         str(REPO_ROOT / "tokenizer" / "sample.model"), "--input", str(docs), "--output", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".partial") for p in out.parent.iterdir()) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), sorted(
        p.name for p in out.parent.iterdir())


@pytest.mark.hostile
@pytest.mark.parametrize(("sig", "status", "word"), [(signal.SIGTERM, EXIT_TERMINATED, "terminated (SIGTERM)"),
                                                     (signal.SIGINT, EXIT_INTERRUPTED, "interrupted")])
def test_a_signal_outside_training_leaves_no_temporary_and_says_so_in_one_line(tmp_path, sig, status, word):
    done, left = _encode_until_signalled(tmp_path, sig)
    assert done.returncode == status, done.stderr[-2000:]
    assert left == []
    assert error_lines(done.stderr)[-1] == f"metatrain encode: {word}"


@pytest.mark.hostile
@pytest.mark.parametrize("argv", [
    ["data", "cache", "--input", "{docs}", "--tokenizer", "{tok}", "--out", "{inside}"],
    ["encode", "--input", "{docs}", "--tokenizer", "{tok}", "--output", "{inside}/ids.jsonl"],
    ["tokenizer", "train", "--input", "{docs}", "--vocab-size", "400", "--out", "{inside}/spm"],
    ["tokenizer", "extend", "--base", "{tok}", "--out", "{inside}/new.model"],
    ["tokenizer", "resize-checkpoint", "--workdir", "{run}", "--tokenizer", "{tok}", "--out", "{inside}"],
    ["eval", "--workdir", "{run}", "--out", "{inside}"],
    ["annotate", "--input", "{docs}", "--out", "{inside}/docs.jsonl", "--generator", "openai",
     "--base-url", "http://127.0.0.1:9/v1", "--model", "m"],
    ["sweep", "plan", "--spec", "{docs}", "--out", "{inside}"],
])
def test_no_command_writes_inside_a_runs_checkpoints(tmp_path, capsys, argv):
    from metatrain.cli import main
    from metatrain.io.paths import SAMPLE_CORPUS, SAMPLE_TOKENIZER

    run = tmp_path / "run"
    (run / "checkpoints" / "3").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    inside = run / "checkpoints" / "555"
    words = [a.format(docs=SAMPLE_CORPUS, tok=SAMPLE_TOKENIZER, run=run, inside=inside) for a in argv]
    assert main(words) == 2
    (line,) = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert f"is inside {run / 'checkpoints'}, the checkpoints of the run {run}" in line
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
