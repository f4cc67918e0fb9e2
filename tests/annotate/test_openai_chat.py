"""`OpenAIChatGenerator` over real HTTP, against the scripted `ChatServer` on 127.0.0.1."""

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import time
import traceback

import openai._base_client
import pytest

from metatrain.annotate.generators import GENERATORS, GenerationError, ThinkRequest
from metatrain.annotate.openai_chat import (
    OpenAIChatGenerator,
    add_openai_options,
    build_openai_generator,
    redact_url,
)
from metatrain.errors import UserError
from tests.annotate.chat_server import ChatServer, Fault, count_words, default_reply

MODEL = "test-model"
SECRET = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture(autouse=True)
def no_api_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture
def fast_backoff(monkeypatch):
    """The client backs off 0.5 s after a timeout or a dropped connection; make it 10 ms."""
    monkeypatch.setattr(openai._base_client, "INITIAL_RETRY_DELAY", 0.01)


def make_request(text: str = "The cat sat on the mat.", seed: int = 7, point: int = 0) -> ThinkRequest:
    messages = ({"role": "system", "content": "Write a thought."}, {"role": "user", "content": text})
    return ThinkRequest(doc_id="doc-1", point=point, messages=messages, context=(), seed=seed)


def make_generator(server: ChatServer, **options) -> OpenAIChatGenerator:
    options = {"timeout": 2.0, "max_retries": 4, "retry_delay": 0.01, **options}
    return OpenAIChatGenerator(server.base_url, MODEL, **options)


def think(server: ChatServer, request: ThinkRequest | None = None, **options):
    async def once():
        generator = make_generator(server, **options)
        try:
            return await generator.think(request or make_request())
        finally:
            await generator.aclose()

    return asyncio.run(once())


def always(fault: Fault):
    return lambda index, body: fault


def test_reply_is_the_stripped_content_with_token_counts():
    with ChatServer() as server:
        reply = think(server)
    body = server.requests[0]
    expected = default_reply(body)
    assert expected != expected.strip()  # the server pads it, so stripping is tested
    assert reply.text == expected.strip()
    assert reply.tokens_in == count_words("Write a thought.") + count_words("The cat sat on the mat.")
    assert reply.tokens_out == count_words(expected)


def test_request_body_and_headers():
    request = make_request(seed=2**40 + 5)
    with ChatServer() as server:
        think(server, request, temperature=0.3, top_p=0.9, max_tokens=17, extra_body={"top_k": 20})
    (body,) = server.requests
    assert body["model"] == MODEL
    assert body["messages"] == list(request.messages)
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.3, 0.9, 17)
    assert body["seed"] == 5  # reduced to 31 bits
    assert body["top_k"] == 20
    assert server.headers[0]["authorization"] == "Bearer unused"


def test_no_seed_when_send_seed_is_off():
    with ChatServer() as server:
        think(server, send_seed=False)
    assert "seed" not in server.requests[0]


def test_empty_reply_is_no_thought():
    with ChatServer(reply=lambda body: Fault("empty")) as server:
        reply = think(server)
    assert reply.text == ""
    assert len(server.requests) == 1


def test_null_content_and_missing_usage():
    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": None}}]}).encode()
    with ChatServer(faults=always(Fault("malformed", body=body))) as server:
        reply = think(server)
    assert (reply.text, reply.tokens_in, reply.tokens_out) == ("", 0, 0)


def test_rate_limit_then_success():
    with ChatServer(faults={0: Fault("status", 429)}) as server:
        reply = think(server)
    assert reply.text == default_reply(server.requests[1]).strip()
    assert len(server.requests) == 2


def test_server_errors_fail_after_all_attempts():
    with ChatServer(faults=always(Fault("status", 500))) as server:
        with pytest.raises(GenerationError) as caught:
            think(server, max_retries=3)
    assert caught.value.reason == (f"POST {server.base_url}/chat/completions: HTTP 500 after 4 attempts: "
                                   "scripted failure (HTTP 500)")  # the server's own message
    assert (caught.value.status, caught.value.settings) == (500, False)
    assert len(server.requests) == 4


def test_client_error_is_not_retried():
    with ChatServer(faults=always(Fault("status", 400))) as server:
        with pytest.raises(GenerationError, match=r"HTTP 400 after 1 attempt: scripted failure \(HTTP 400\)$") as caught:
            think(server)
    assert (caught.value.status, caught.value.settings) == (400, True)
    assert len(server.requests) == 1


def test_timeout_then_success(fast_backoff):
    with ChatServer(faults={0: Fault("timeout", seconds=5.0)}) as server:
        reply = think(server, timeout=0.3)
    assert reply.text
    assert len(server.requests) == 2


def test_timeouts_fail_after_all_attempts(fast_backoff):
    with ChatServer(faults=always(Fault("timeout", seconds=5.0))) as server:
        with pytest.raises(GenerationError, match=r"timed out \(after 0.3 s\) after 2 attempts$"):
            think(server, timeout=0.3, max_retries=1)
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    "body", [b'{"id": "chatcmpl-1", "choi', b"<html>Bad Gateway</html>", b'{"object": "chat.completion"}', b"[]"]
)
def test_malformed_then_success(body):
    with ChatServer(faults={0: Fault("malformed", body=body), 1: Fault("malformed", body=body)}) as server:
        reply = think(server)
    assert reply.text == default_reply(server.requests[2]).strip()
    assert len(server.requests) == 3


def test_malformed_fails_after_all_attempts():
    with ChatServer(faults=always(Fault("malformed"))) as server:
        with pytest.raises(GenerationError, match=r"the response is not JSON after 3 attempts$"):
            think(server, max_retries=2)
    assert len(server.requests) == 3


def test_client_and_own_retries_share_one_budget():
    faults = {0: Fault("status", 503), 1: Fault("malformed"), 2: Fault("status", 503), 3: Fault("status", 503)}
    with ChatServer(faults=faults) as server:
        with pytest.raises(GenerationError, match=r"HTTP 503 after 3 attempts: scripted failure \(HTTP 503\)$"):
            think(server, max_retries=2)
    assert len(server.requests) == 3


def test_dropped_connection_then_success(fast_backoff):
    with ChatServer(faults={0: Fault("close")}) as server:
        reply = think(server)
    assert reply.text
    assert len(server.requests) == 2


def test_dropped_connection_is_a_connection_failure_not_a_500(fast_backoff):
    with ChatServer(faults=always(Fault("close"))) as server:
        with pytest.raises(GenerationError, match=r": connection failed \(\w+\) after 2 attempts$"):
            think(server, max_retries=1)


@pytest.mark.parametrize("status", [401, 500])
def test_api_key_never_leaks(monkeypatch, caplog, status):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    with ChatServer(faults=always(Fault("status", status, echo_headers=True))) as server:
        generator_settings = make_generator(server).settings
        with pytest.raises(GenerationError) as caught:
            think(server, max_retries=1)
    assert server.headers[0]["authorization"] == f"Bearer {SECRET}"  # sent, and echoed back
    error = caught.value
    shown = [error.reason, str(error), repr(error), "".join(traceback.format_exception(error)), caplog.text]
    assert all(SECRET not in text for text in shown)
    assert SECRET not in json.dumps(generator_settings)
    assert caplog.records  # the client's and httpx's debug logs were captured


def test_requests_overlap():
    requests = [make_request(text=f"Document number {i}.", point=i) for i in range(16)]

    async def all_at_once(server):
        generator = make_generator(server)
        try:
            return await asyncio.gather(*(generator.think(request) for request in requests))
        finally:
            await generator.aclose()

    with ChatServer(latency=0.2) as server:
        replies = asyncio.run(all_at_once(server))
    assert server.max_in_flight >= 8
    assert len({reply.text for reply in replies}) == 16


def test_redact_url_drops_credentials_and_query():
    assert redact_url("https://user:pw@api.example.com:8443/v1/?key=pw") == "https://api.example.com:8443/v1/"
    assert redact_url("http://[::1]:8000/v1") == "http://[::1]:8000/v1"


def parse(argv):
    parser = argparse.ArgumentParser()
    add_openai_options(parser)
    return parser.parse_args(argv)


def test_builder_from_cli_options():
    assert GENERATORS["openai"] is build_openai_generator
    args = parse(
        ["--base-url", "http://127.0.0.1:9/v1/", "--model", "m", "--top-p", "0.5", "--extra-body", '{"top_k": 3}']
    )
    generator = build_openai_generator(args)
    assert (generator.kind, generator.model) == ("openai", "m")
    assert generator.settings == {
        "base_url": "http://127.0.0.1:9/v1",
        "temperature": 0.7,
        "top_p": 0.5,
        "max_tokens": 256,
        "extra_body": {"top_k": 3},
    }
    assert (generator.timeout, generator.max_retries, generator.send_seed) == (60.0, 4, True)
    asyncio.run(generator.aclose())


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], r"needs --base-url and --model"),
        (["--base-url", "http://h/v1"], r"needs --model \("),
        (["--model", "m"], r"needs --base-url \("),
        (["--base-url", "http://h/v1", "--model", "m", "--extra-body", "{top_k"], r"--extra-body is not JSON"),
        (["--base-url", "http://h/v1", "--model", "m", "--extra-body", "[1]"], r"must be a JSON object"),
        (["--base-url", "http://h/v1", "--model", "m", "--max-retries", "-1"], r"--max-retries must be >= 0"),
        (["--base-url", "http://h/v1", "--model", "m", "--timeout", "0"], r"--timeout must be > 0"),
    ],
)
def test_builder_refuses_bad_options(argv, message):
    with pytest.raises(UserError, match=message) as caught:
        build_openai_generator(parse(argv))
    assert "\n" not in str(caught.value)


def test_import_does_not_load_openai():
    code = "import sys, metatrain.annotate.openai_chat; print('openai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_fault_kind_is_checked():
    with pytest.raises(ValueError, match="not one of"):
        Fault("explode")


# -- issue 25: checks before the first request, bounded requests ------------------------------


def _annotate(server: ChatServer, tmp_path, *extra: str) -> int:
    from metatrain.cli import main

    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"id": "a", "text": "One passage.\n\nAnother passage.\n"}) + "\n")
    return main(["annotate", "--input", str(raw), "--out", str(tmp_path / "out.jsonl"), "--generator", "openai",
                 "--base-url", server.base_url, "--model", MODEL, "--no-progress", *extra])


@pytest.mark.hostile
def test_max_tokens_beyond_the_served_context_is_refused_before_any_request(tmp_path, capsys):
    with ChatServer(models=[{"id": MODEL, "object": "model", "max_model_len": 256}]) as server:
        assert _annotate(server, tmp_path) == 2
        assert server.requests == []
        assert _annotate(server, tmp_path, "--max-tokens", "32") == 0  # nothing was written by the refusal
    err = capsys.readouterr().err
    (line,) = [l for l in err.splitlines() if l.startswith("metatrain annotate:")]
    assert "--max-tokens 256 cannot fit the served model's context of 256 tokens" in line
    assert "use --max-tokens <= " in line


@pytest.mark.hostile
def test_a_model_the_server_does_not_list_is_refused_before_any_request(tmp_path, capsys):
    with ChatServer(models=[{"id": "other", "object": "model"}]) as server:
        assert _annotate(server, tmp_path) == 2
        assert server.requests == []
    assert "--model test-model is not served" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.hostile
def test_the_timeout_bounds_the_whole_request_not_each_read():
    start = time.monotonic()
    with ChatServer(faults=always(Fault("trickle", seconds=0.25))) as server:
        with pytest.raises(GenerationError, match=r"timed out \(after 1 s\) after 1 attempt"):
            think(server, timeout=1.0, max_retries=0)
    assert time.monotonic() - start < 15  # the body takes over 60 s to trickle in


@pytest.mark.hostile
def test_a_hung_request_is_reported_as_it_is_retried(caplog):
    caplog.set_level(logging.WARNING)
    with ChatServer(faults={0: Fault("timeout", seconds=5.0)}) as server:
        assert think(server, timeout=0.3).text
    (record,) = [r for r in caplog.records if r.name == "metatrain.annotate.openai_chat"]
    assert "timed out (after 0.3 s)" in record.getMessage() and "retrying" in record.getMessage()
    assert "\n" not in record.getMessage()


@pytest.mark.hostile
@pytest.mark.parametrize("url", ["http://[::1", "notaurl", "ftp://x", "http://host:99999/v1", "http:///v1"])
def test_a_malformed_base_url_is_one_line_before_any_work(tmp_path, capsys, url):
    from metatrain.cli import main

    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"id": "a", "text": "One passage."}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["annotate", "--input", str(raw), "--out", str(out), "--generator", "openai",
                 "--base-url", url, "--model", MODEL, "--no-progress"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("metatrain annotate: error: --base-url") and "http://" in err[0]
    assert not out.exists()
