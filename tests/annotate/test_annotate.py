"""`metatrain annotate` end to end: the real command against a real OpenAI-compatible HTTP
server on 127.0.0.1 (scripted replies, injected faults), its output read back by `encode`;
an `--out` on local disk and in a bucket (`store`)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metatrain.cli import main
from metatrain.documents import read_documents
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_TOKENIZER
from metatrain.io.storage import as_path
from metatrain.tokenizer import Encoder

from .chat_server import ChatServer, Fault, last_user_message

SECRET = "sk-test-0123456789-do-not-leak"

RAW = [
    {"id": "alpha", "text": "The river rises in the north.\n\nIt reaches the sea after 900 km.\n", "title": "Rivers"},
    {"id": "beta", "text": "Exports grew by 3 percent in 2019.\r\n\r\nImports fell. Caf\u00e9 prices \U0001f600 rose.",
     "url": "https://example.org/b"},
    {"id": "gamma", "text": "One paragraph only, no newline at the end"},
]


def write_raw(path: Path, records=RAW) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def doc_of(body) -> str:
    """The document id a request is about (the default templates show `Document: <title or id>`)."""
    match = re.search(r"^Document: (.*)$", last_user_message(body), re.MULTILINE)
    return match.group(1) if match else ""


def annotate(server: ChatServer, raw: Path, out: Path, *extra: str) -> int:
    return main(["annotate", "--input", str(raw), "--out", str(out), "--generator", "openai",
                 "--base-url", server.base_url, "--model", "scripted", "--timeout", "2", "--no-progress",
                 *extra])


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def text_of(record: dict) -> str:
    return "".join(s["text"] for s in record["segments"] if s["kind"] == "text")


@pytest.fixture()
def raw(tmp_path) -> Path:
    return write_raw(tmp_path / "raw.jsonl")


def test_passages_get_thoughts_and_the_text_is_unchanged(raw, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    out = tmp_path / "docs.jsonl"
    with ChatServer() as server:
        assert annotate(server, raw, out) == 0
        requests = server.requests
        headers = server.headers
    got = records(out)
    assert [r["id"] for r in got] == ["alpha", "beta", "gamma"]
    assert [text_of(r) for r in got] == [r["text"] for r in RAW]
    alpha = got[0]
    assert [s["kind"] for s in alpha["segments"]] == ["text", "thinking", "text", "thinking"]
    assert alpha["segments"][1]["text"].startswith("Thinking about ")  # stripped reply
    assert alpha["title"] == "Rivers" and got[1]["url"] == "https://example.org/b"  # metadata kept
    a = alpha["annotation"]
    assert (a["generator"], a["model"], a["where"], a["points"], a["accepted"], a["rejected"]) == (
        "openai", "scripted", "passage", 2, 2, 0)
    assert len(a["prompt_sha256"]) == 64 and a["settings"]["temperature"] == 0.7
    assert len(requests) == sum(r["annotation"]["points"] for r in got)
    assert all(h.get("authorization") == f"Bearer {SECRET}" for h in headers)
    err = capsys.readouterr().err
    assert "annotated 3 documents" in err and "blocks: 5 accepted, 0 rejected" in err
    for path in (out, Path(str(out) + ".annotate.json")):
        assert SECRET not in path.read_text()
    assert SECRET not in err
    # What annotate writes, encode reads: the real command, the real encoder.
    encoded = tmp_path / "ids.jsonl"
    assert main(["encode", "--tokenizer", str(SAMPLE_TOKENIZER), "--input", str(out), "--output", str(encoded)]) == 0
    assert len(encoded.read_text().splitlines()) == 3


def test_document_and_chunk_placements(raw, tmp_path):
    with ChatServer() as server:
        assert annotate(server, raw, tmp_path / "tpt.jsonl", "--where", "document") == 0
        assert annotate(server, raw, tmp_path / "bolt.jsonl", "--where", "chunk", "--split", "sentence",
                        "--order", "random", "--seed", "7") == 0
    for r in records(tmp_path / "tpt.jsonl"):
        assert [s["kind"] for s in r["segments"]] == ["text", "thinking"]
    bolt = records(tmp_path / "bolt.jsonl")
    assert [text_of(r) for r in bolt] == [r["text"] for r in RAW]
    kinds = [s["kind"] for r in bolt for s in r["segments"]]
    assert kinds.count("thinking") == sum(r["annotation"]["accepted"] for r in bolt) >= 3


def test_faults_are_retried_and_a_document_that_keeps_failing_is_listed(raw, tmp_path, capsys):
    faults = {0: Fault("status", 429), 1: Fault("status", 500), 2: Fault("malformed"), 3: Fault("close"),
              4: Fault("timeout", seconds=5)}

    def fault(index, body):
        if doc_of(body) == "beta":
            return Fault("status", 503)  # always: beta fails after the retries
        return faults.get(index)

    out = tmp_path / "docs.jsonl"
    with ChatServer(faults=fault) as server:
        assert annotate(server, raw, out, "--max-retries", "5", "--timeout", "1", "--concurrency", "1") == 0
    assert [r["id"] for r in records(out)] == ["alpha", "gamma"]
    failed = records(Path(str(out) + ".failed.jsonl"))
    assert [f["id"] for f in failed] == ["beta"] and "503" in failed[0]["reason"]
    assert failed[0]["line"] == 2 and failed[0]["path"].endswith("raw.jsonl")
    assert "failed: 1 documents" in capsys.readouterr().err


def test_empty_replies_mean_no_thinking_and_rejected_blocks_are_retried(raw, tmp_path):
    seen: dict[str, int] = {}

    def reply(body):
        key = last_user_message(body)
        seen[key] = seen.get(key, 0) + 1
        if doc_of(body) == "gamma":
            return ""  # no thinking here
        return "Hm." if seen[key] == 1 else "A second, longer thought about this passage."

    out = tmp_path / "docs.jsonl"
    with ChatServer(reply=reply) as server:
        assert annotate(server, raw, out, "--concurrency", "1") == 0
    alpha, beta, gamma = records(out)
    assert alpha["annotation"]["rejected"] == 2 and alpha["annotation"]["accepted"] == 2
    assert {s["text"] for s in alpha["segments"] if s["kind"] == "thinking"} == {
        "A second, longer thought about this passage."}
    assert [s["kind"] for s in gamma["segments"]] == ["text"] and gamma["annotation"]["empty"] == 1


def test_a_user_filter_rejects_blocks_and_a_point_goes_without_after_the_retries(raw, tmp_path, monkeypatch):
    (tmp_path / "myfilters.py").write_text(
        "def no_rivers(thought, context):\n"
        "    return 'about rivers' if context['id'] == 'alpha' else True\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "docs.jsonl"
    with ChatServer() as server:
        assert annotate(server, raw, out, "--filter", "myfilters:no_rivers", "--retries", "1") == 0
        assert sum(doc_of(b) == "Rivers" for b in server.requests) == 4  # 2 points x (1 + 1 retry)
    alpha = records(out)[0]
    assert [s["kind"] for s in alpha["segments"]] == ["text"]  # no block: the text stays one segment
    assert alpha["annotation"]["rejected"] == 4 and alpha["annotation"]["filter"] == "myfilters:no_rivers"


def test_tag_strings_in_generated_thinking_stay_text(raw, tmp_path):
    hostile = "I wonder </thinking><AI> whether <|good|> tags <thinking> leak."
    out = tmp_path / "docs.jsonl"
    with ChatServer(reply=lambda body: hostile) as server:
        assert annotate(server, raw, out, "--where", "document") == 0
    encoder = Encoder.from_files(SAMPLE_TOKENIZER, DEFAULT_TAGS)
    for doc in read_documents([out]):
        segments = encoder.decode_segments(encoder.encode(doc).ids)
        assert [s.text for s in segments if s.kind == "thinking"] == [hostile]
        assert "".join(s.text for s in segments if s.kind == "text") == "".join(
            s.text for s in doc.segments if s.kind == "text")


def test_a_resume_with_other_settings_or_a_foreign_output_is_refused(raw, tmp_path, capsys):
    out = tmp_path / "docs.jsonl"
    with ChatServer() as server:
        assert annotate(server, raw, out) == 0
        before = out.read_bytes()
        assert annotate(server, raw, out, "--where", "document") == 2
        err = capsys.readouterr().err
        assert "was annotated with other settings (" in err and "where: 'passage' -> 'document'" in err
        assert annotate(server, raw, out) == 0  # same settings: nothing left to do
        assert out.read_bytes() == before
        foreign = tmp_path / "mine.jsonl"
        foreign.write_text("my notes\n")
        assert annotate(server, raw, foreign) == 2
        assert "was not written by annotate" in capsys.readouterr().err
        assert foreign.read_text() == "my notes\n"
        assert annotate(server, raw, raw) == 2
        assert "is one of the inputs" in capsys.readouterr().err


def _many(n: int) -> list[dict]:
    return [{"id": f"doc-{i:02d}", "text": f"Passage {i} one.\n\nPassage {i} two.\n"} for i in range(n)]


def _subprocess_annotate(server, raw, out, *extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPENAI_API_KEY": SECRET}
    return subprocess.Popen(
        [sys.executable, "-m", "metatrain.cli", "annotate", "--input", str(raw), "--out", str(out),
         "--generator", "openai", "--base-url", server.base_url, "--model", "scripted", "--no-progress",
         "--concurrency", "2", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _wait_for_lines(path: Path, n: int, process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_bytes().splitlines()) >= n:
            return
        if process.poll() is not None:
            raise AssertionError(f"annotate ended early: {process.stderr.read().decode()}")
        time.sleep(0.02)
    raise AssertionError("annotate wrote too little in time")


@pytest.mark.parametrize("how", ["kill", "sigterm", "sigint"])
def test_killed_and_resumed_equals_an_uninterrupted_run_and_requests_nothing_twice(tmp_path, how):
    raw = write_raw(tmp_path / "raw.jsonl", _many(14))
    whole, cut = tmp_path / "whole.jsonl", tmp_path / "cut.jsonl"
    with ChatServer(latency=0.15) as server:  # one server: its URL is part of the provenance
        assert annotate(server, raw, whole, "--concurrency", "2") == 0
        process = _subprocess_annotate(server, raw, cut)
        _wait_for_lines(cut, 4, process)
        signum, status = {"kill": (signal.SIGKILL, -signal.SIGKILL), "sigterm": (signal.SIGTERM, 75),
                          "sigint": (signal.SIGINT, 130)}[how]
        process.send_signal(signum)
        code = process.wait(timeout=60)
        assert code == status, process.stderr.read().decode()
        finished = [r["id"] for r in records(cut)]
        assert 4 <= len(finished) < 14
        before = len(server.requests)
        resumed = _subprocess_annotate(server, raw, cut)
        assert resumed.wait(timeout=120) == 0, resumed.stderr.read().decode()
        again = {doc_of(b) for b in server.requests[before:]}
    assert not again & set(finished), "a finished document was requested again"
    assert cut.read_bytes() == whole.read_bytes()
    assert SECRET not in cut.read_text()


def test_a_line_cut_short_by_a_crash_is_done_again(raw, tmp_path):
    out = tmp_path / "docs.jsonl"
    with ChatServer() as server:
        assert annotate(server, raw, out) == 0
        whole = out.read_bytes()
        out.write_bytes(whole[: whole.rindex(b"\n", 0, len(whole) - 1) + 40])  # the last line, cut
        before = len(server.requests)
        assert annotate(server, raw, out) == 0
        assert {doc_of(b) for b in server.requests[before:]} == {"gamma"}  # only the cut document
    assert out.read_bytes() == whole


def test_a_prompt_file_replaces_the_template_and_unknown_fields_are_refused(raw, tmp_path, capsys):
    template = tmp_path / "mine.txt"
    template.write_text("[$id $point/$points] $passage")
    out = tmp_path / "docs.jsonl"
    with ChatServer() as server:
        assert annotate(server, raw, out, "--prompt", str(template)) == 0
        messages = [last_user_message(b) for b in server.requests]
    assert {"[alpha 1/2] The river rises in the north.\n\n", "[alpha 2/2] It reaches the sea after 900 km.\n"} <= set(messages)
    sha = __import__("hashlib").sha256(template.read_bytes()).hexdigest()
    assert records(out)[0]["annotation"]["prompt_sha256"] == sha
    template.write_text("Think about $pasage.")
    with ChatServer() as server:
        assert annotate(server, raw, tmp_path / "other.jsonl", "--prompt", str(template)) == 2
        assert not server.requests
    assert "uses $pasage, which is not a template field" in capsys.readouterr().err


def test_annotating_annotated_documents_again_keeps_the_lineage(raw, tmp_path):
    first, second = tmp_path / "gen0.jsonl", tmp_path / "gen1.jsonl"
    with ChatServer() as server:
        assert annotate(server, raw, first) == 0
        assert annotate(server, first, second, "--replace-thinking", "--where", "document") == 0
    for a, b in zip(records(first), records(second)):
        assert text_of(a) == text_of(b) and a["id"] == b["id"]
        assert b["annotation"]["where"] == "document" and b["annotation"]["previous"] == a["annotation"]
        assert [s["kind"] for s in b["segments"]] == ["text", "thinking"]


# -- an --out in a store: local disk or a bucket (the GCS emulator) -----------------------

SUFFIXES = ("", ".failed.jsonl", ".annotate.json")


def lines(path: str) -> list[bytes]:
    return as_path(path).read_bytes().splitlines() if as_path(path).exists() else []


def test_an_out_in_a_store_is_byte_identical_to_a_local_one(raw, tmp_path, store):
    def fault(index, body):
        return Fault("status", 503) if doc_of(body) == "beta" else None  # beta fails: a failed file

    local, remote = tmp_path / "docs.jsonl", f"{store}/runs/docs.jsonl"
    with ChatServer(faults=fault) as server:  # one server: its URL is part of the provenance
        assert annotate(server, raw, local, "--max-retries", "1") == 0
        assert annotate(server, raw, remote, "--max-retries", "1") == 0
    for suffix in SUFFIXES:
        assert as_path(remote + suffix).read_bytes() == (tmp_path / f"docs.jsonl{suffix}").read_bytes(), suffix
    assert len(lines(remote)) == 2 and len(lines(remote + ".failed.jsonl")) == 1
    assert store.files() == sorted(f"runs/docs.jsonl{suffix}" for suffix in SUFFIXES)  # no compose parts left


def test_stopped_by_sigterm_and_resumed_in_a_store_equals_an_uninterrupted_run(tmp_path, store):
    n = 16
    raw = write_raw(tmp_path / "raw.jsonl", _many(n))
    whole, cut = tmp_path / "whole.jsonl", f"{store}/cut.jsonl"
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
        finished = lines(cut)  # in a bucket: uploaded on SIGTERM, well before the 5-second interval
        assert 0 < len(finished) < n
        assert whole.read_bytes().splitlines()[:len(finished)] == finished  # a prefix, whole lines
        done = {f"doc-{i:02d}" for i in range(len(finished))}
        before = len(server.requests)
        resumed = _subprocess_annotate(server, raw, cut)
        assert resumed.wait(timeout=120) == 0, resumed.stderr.read().decode()
        again = {doc_of(b) for b in server.requests[before:]}
    assert not again & done, "a finished document was requested again"
    assert as_path(cut).read_bytes() == whole.read_bytes()


def test_refused_resumes_change_no_file(raw, store, capsys):
    out = f"{store}/docs.jsonl"
    with ChatServer() as server:
        assert annotate(server, raw, out) == 0
        files = store.snapshot()
        capsys.readouterr()
        assert annotate(server, raw, out, "--where", "document") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {out} was annotated with other settings (" in err
        assert "where: 'passage' -> 'document'" in err
        assert store.snapshot() == files
        assert annotate(server, raw, out) == 0  # the same settings: nothing left to do, nothing rewritten
        assert store.snapshot() == files


@pytest.mark.bucket
def test_a_bucket_out_whose_last_line_is_cut_short_is_refused_and_not_rewritten(raw, bucket_store, capsys):
    """In a bucket a cut line is another writer's, not a crash's (a local one is done again:
    `test_a_line_cut_short_by_a_crash_is_done_again`)."""
    out = f"{bucket_store}/docs.jsonl"
    with ChatServer() as server:
        assert annotate(server, raw, out) == 0
        whole = as_path(out).read_bytes()
        as_path(out).write_bytes(whole[:-1])  # another writer left a last line without its newline
        files = bucket_store.snapshot()
        capsys.readouterr()
        assert annotate(server, raw, out) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{out}:3: the last line is cut short" in err
        assert bucket_store.snapshot() == files


def test_an_out_that_is_a_directory_is_refused(raw, store, capsys):
    store.write_text("runs/part-0.jsonl", "{}\n")
    files = store.snapshot()
    with ChatServer() as server:
        assert annotate(server, raw, f"{store}/runs") == 2
        assert server.requests == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {store}/runs is a directory" in err
    assert store.snapshot() == files


# -- issue 25: nothing fails silently ------------------------------------------------------

TOO_LONG = {"error": {"message": "max_tokens 256 does not fit: the prompt has 180 tokens and the model's "
                                 "context is 256; ask for at most 76", "type": "invalid_request_error",
                      "param": None, "code": "invalid_value"}}


@pytest.mark.hostile
@pytest.mark.parametrize("status, exit_code, said", [(400, 2, "ask for at most 76"), (401, 2, "HTTP 401"),
                                                     (503, 74, "HTTP 503")])
def test_a_run_where_every_request_fails_exits_non_zero_with_the_servers_message(raw, tmp_path, capsys, status,
                                                                                 exit_code, said):
    fault = Fault("status", status, body=TOO_LONG if status == 400 else None, retry_after_ms=1)
    out = tmp_path / "docs.jsonl"
    with ChatServer(faults=lambda index, body: fault) as server:
        assert annotate(server, raw, out, "--max-retries", "1") == exit_code
    assert out.read_text() == ""
    failed = records(Path(str(out) + ".failed.jsonl"))
    assert [f["id"] for f in failed] == ["alpha", "beta", "gamma"]
    assert all(f["status"] == status and said in f["reason"] for f in failed)
    if status == 400:
        assert all(f["message"] == TOO_LONG["error"]["message"] for f in failed)
    err = capsys.readouterr().err
    (line,) = [l for l in err.splitlines() if l.startswith("metatrain annotate:")]
    assert "no document was annotated" in line and said in line and ".failed.jsonl" in line


@pytest.mark.hostile
def test_failed_documents_are_retried_by_the_next_run(raw, tmp_path, capsys):
    out = tmp_path / "docs.jsonl"
    with ChatServer(faults=lambda index, body: Fault("status", 401)) as server:
        assert annotate(server, raw, out) == 2
    capsys.readouterr()
    with ChatServer() as server:  # the key is fixed, the server restarted (another port)
        assert annotate(server, raw, out) == 0
        assert {doc_of(b) for b in server.requests} == {"Rivers", "beta", "gamma"}
    assert [r["id"] for r in records(out)] == ["alpha", "beta", "gamma"]
    err = capsys.readouterr().err
    assert "annotated 3 documents" in err and "were done already" not in err


@pytest.mark.hostile
def test_a_resume_after_a_partial_failure_retries_only_the_failed_documents(raw, tmp_path):
    out = tmp_path / "docs.jsonl"
    with ChatServer(faults=lambda index, body: Fault("status", 400) if doc_of(body) == "beta" else None) as server:
        assert annotate(server, raw, out) == 0  # some documents written: the run did something
        assert [r["id"] for r in records(out)] == ["alpha", "gamma"]
    with ChatServer() as server:
        assert annotate(server, raw, out) == 0
        assert {doc_of(b) for b in server.requests} == {"beta"}
        assert annotate(server, raw, out) == 0  # all done: the retried document's place is accepted
    assert sorted(r["id"] for r in records(out)) == ["alpha", "beta", "gamma"]


@pytest.mark.hostile
@pytest.mark.parametrize("tamper, number", [("swap", 3), ("foreign", 4), ("duplicate", 4)])
def test_a_tampered_out_is_refused_on_resume_and_not_touched(raw, tmp_path, capsys, tamper, number):
    out = tmp_path / "docs.jsonl"
    with ChatServer() as server:
        assert annotate(server, raw, out) == 0
        lines = out.read_text().splitlines(keepends=True)
        if tamper == "swap":
            lines[1], lines[2] = lines[2], lines[1]
        elif tamper == "foreign":
            lines.append(json.dumps({"id": "not-an-input", "segments": [{"kind": "text", "text": "x"}]}) + "\n")
        else:
            lines.append(lines[0])
        out.write_text("".join(lines))
        before = out.read_bytes()
        capsys.readouterr()
        requests = len(server.requests)
        assert annotate(server, raw, out) == 2
        assert len(server.requests) == requests
    err = capsys.readouterr().err
    (line,) = [l for l in err.splitlines() if l.strip()]
    assert f"{out}:{number}:" in line and "another --out" in line
    assert out.read_bytes() == before


@pytest.mark.hostile
def test_a_restarted_server_on_another_port_continues_the_run(raw, tmp_path):
    out = tmp_path / "docs.jsonl"
    with ChatServer() as server:
        assert annotate(server, raw, out) == 0
    whole = out.read_bytes()
    out.write_bytes(whole[: whole.index(b"\n") + 1])  # stopped after the first document
    with ChatServer() as server:  # another port
        assert annotate(server, raw, out) == 0
        assert {doc_of(b) for b in server.requests} == {"beta", "gamma"}
    assert [r["id"] for r in records(out)] == ["alpha", "beta", "gamma"]


@pytest.mark.hostile
def test_a_run_begun_when_the_address_was_a_setting_still_continues(raw, tmp_path):
    out = tmp_path / "docs.jsonl"
    with ChatServer() as server:
        assert annotate(server, raw, out) == 0
        settings_file = Path(str(out) + ".annotate.json")
        earlier = json.loads(settings_file.read_text())
        earlier["settings"]["base_url"] = server.base_url  # as runs before issue 25 stored it
        settings_file.write_text(json.dumps(earlier))
    whole = out.read_bytes()
    out.write_bytes(whole[: whole.index(b"\n") + 1])
    with ChatServer() as server:
        assert annotate(server, raw, out) == 0
    assert [r["id"] for r in records(out)] == ["alpha", "beta", "gamma"]


@pytest.mark.hostile
def test_a_reply_that_restates_the_mantra_keeps_only_the_thought(raw, tmp_path):
    from metatrain.tokenizer.mantra import DEFAULT_MANTRA

    restated = DEFAULT_MANTRA.replace("\n", " ") + "\nThe river's length matters for what follows."
    out = tmp_path / "docs.jsonl"
    with ChatServer(reply=lambda body: restated) as server:
        assert annotate(server, raw, out, "--where", "document") == 0
    thoughts = [s["text"] for r in records(out) for s in r["segments"] if s["kind"] == "thinking"]
    assert thoughts == ["The river's length matters for what follows."] * 3


@pytest.mark.hostile
@pytest.mark.parametrize("content", ["", '{"no id": 1}\n{not json\n'])
def test_an_input_without_one_valid_document_fails_instead_of_writing_nothing(tmp_path, capsys, content):
    raw = tmp_path / "raw.jsonl"
    raw.write_text(content)
    out = tmp_path / "docs.jsonl"
    with ChatServer() as server:
        assert annotate(server, raw, out) == 2
        assert server.requests == []
    (line,) = [l for l in capsys.readouterr().err.splitlines() if l.startswith("metatrain annotate:")]
    assert "the input holds no document to annotate" in line
    assert ("2 bad records skipped" in line) == bool(content)

