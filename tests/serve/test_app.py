"""`metatrain serve`'s HTTP API, end to end: the real app under uvicorn, the official
`openai` client, raw HTTP for what a client library would not send."""

from __future__ import annotations

import http.client
import json
import socket
import time

import numpy as np
import openai
import pytest

from metatrain.documents import Document, Segment
from metatrain.engine.sampling import SamplingConfig
from metatrain.generate.generator import recover_segments
from metatrain.generate.prompts import encode_prompt
from metatrain.serve.app import Reply, chat_prompt, chat_renderer, completion_renderer
from metatrain.serve.requests import parse_sampling

PROMPT = "Background: the river"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a river?"},
        {"role": "assistant", "content": "Water that flows."}, {"role": "user", "content": "And a lake?"}]


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=60)


def _document(messages) -> Document:
    modes = {"system": "human", "user": "human", "assistant": "ai"}
    return Document("chat", tuple(Segment("text", m["content"], mode=modes[m["role"]]) for m in messages))


def _request(served, method: str, path: str, body: bytes | dict | None = None) -> tuple[int, bytes]:
    """(status, body) of one raw HTTP request to the server."""
    content = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    try:
        connection.request(method, path, content, {"content-type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _wait_idle(served, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while any(e.active_rows for e in served.app.state.engines):
        assert time.monotonic() < deadline, "a row kept its slot"
        time.sleep(0.01)


# -- models, completions, chat ----------------------------------------------------------------


def test_models_lists_the_work_directory(served, client):
    (model,) = client.models.list().data
    assert model.id == served.model and model.owned_by == "metatrain" and model.object == "model"


@pytest.mark.hostile
def test_models_says_the_context_as_vllm_does(served):
    """A client (`metatrain annotate`) checks its `max_tokens` against it before asking."""
    status, body = _request(served, "GET", "/v1/models")
    (card,) = json.loads(body)["data"]
    assert status == 200 and card["max_model_len"] == served.generator.model_config.max_seq_len


@pytest.mark.parametrize("mode", [None, "ai"])
def test_greedy_completion_is_what_generate_gives(served, client, mode):
    (sample,) = served.generator.generate([PROMPT], lock_mode=mode, max_new_tokens=24,
                                          sampling=SamplingConfig(0.0))
    reply = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=24, temperature=0,
                                      extra_body={"mode": mode} if mode else None)
    (choice,) = reply.choices
    assert choice.text == served.generator.render(sample)
    assert choice.finish_reason == {"length": "length"}.get(sample.finish_reason, "stop")
    assert reply.usage.completion_tokens == len(sample.ids)
    assert reply.usage.prompt_tokens == len(encode_prompt(served.generator.encoder, PROMPT).ids)
    assert reply.object == "text_completion" and reply.model == served.model
    if mode:
        assert choice.text.startswith("<AI>")
    streamed = client.completions.create(model=served.model, prompt=[PROMPT], max_tokens=24, temperature=0,
                                         stream=True, extra_body={"mode": mode} if mode else None)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_greedy_chat_is_what_generate_gives_under_the_lock(served, client):
    (sample,) = served.generator.generate([_document(CHAT)], lock_mode="ai", max_new_tokens=30,
                                          sampling=SamplingConfig(0.0))
    reply = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=30, temperature=0)
    (choice,) = reply.choices
    message = choice.message.model_dump()
    assert message["role"] == "assistant"
    assert message["content"] == "".join(s.text for s in sample.segments if s.kind == "text")
    assert message["reasoning_content"] == "".join(s.text for s in sample.segments if s.kind == "thinking")
    assert choice.finish_reason == {"length": "length"}.get(sample.finish_reason, "stop")
    assert reply.usage.completion_tokens == len(sample.ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    streamed = list(client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=30,
                                                   temperature=0, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in streamed)
    reasoning = "".join((c.choices[0].delta.model_dump().get("reasoning_content") or "") for c in streamed)
    assert (content, reasoning) == (message["content"], message["reasoning_content"])
    assert streamed[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.object == "chat.completion.chunk" for c in streamed)

    hidden = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=30, temperature=0,
                                            extra_body={"hide_thinking": True})
    assert hidden.choices[0].message.content == message["content"]
    assert hidden.choices[0].message.model_dump().get("reasoning_content") is None


def test_thinking_is_split_from_content_as_tokens_stream(served):
    """A reply with a thinking block (the ids a model would produce), fed in pieces: the
    deltas add up to the final fields, the mantra is never sent, nor a partial character."""
    encoder = served.generator.encoder
    reply_doc = Document("d", (Segment("text", "Hello there", mode="ai"), Segment("thinking", "  Hm. é 日本"),
                               Segment("text", " and more.")))
    ids = encoder.encode(reply_doc).ids.tolist()
    ids = ids[ids.index(encoder.tag_ids["<AI>"]):-1]  # from <AI> to </AI>, as under the lock
    prompt = chat_prompt(encoder, [("user", "Hi")], None)
    segments = recover_segments(encoder, ids, prompt.prompt_state)
    for step in (1, 3, 4):
        for hide in (False, True):
            reply = Reply(chat_renderer(encoder, prompt.prompt_state, hide), prompt.prefix, (), "content")
            deltas = [reply.add(ids[i: i + step]) for i in range(len(prompt.prefix), len(ids), step)]
            deltas.append(reply.finish())
            joined = {f: "".join(d.get(f, "") for d in deltas) for f in ("content", "reasoning_content")}
            assert joined["content"] == "Hello there and more." == "".join(s.text for s in segments if s.kind == "text")
            assert joined["reasoning_content"] == ("" if hide else "  Hm. é 日本")
            assert not any("\ufffd" in v or "I feel no fear" in v for d in deltas for v in d.values())
    completion = Reply(completion_renderer(encoder, prompt.prompt_state, False), prompt.prefix, ("日本",), "text")
    pieces = [completion.add([t]) for t in ids[len(prompt.prefix):] if not completion.stopped]
    assert completion.stopped and "".join(p.get("text", "") for p in pieces) == completion.sent["text"]
    assert completion.sent["text"].endswith("Hm. é ") and "\ufffd" not in completion.sent["text"]


def test_n_choices_and_seeds(served, client):
    kwargs = dict(model=served.model, prompt=PROMPT, max_tokens=12, temperature=1.0, n=2, seed=7)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert 2 <= first.usage.completion_tokens <= 2 * 12
    other = client.completions.create(**{**kwargs, "seed": 8})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]
    streamed = list(client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=8, n=2,
                                                   seed=3, stream=True))
    assert {c.choices[0].index for c in streamed} == {0, 1}
    assert sum(c.choices[0].finish_reason is not None for c in streamed) == 2


def test_stop_string_cuts_the_text(served, client):
    full = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=40, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3
    cut = text[: text.find(stop)]
    reply = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop])
    assert reply.choices[0].text == cut and reply.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=served.model, prompt=PROMPT, max_tokens=40, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    _wait_idle(served)


def test_literal_tags_in_messages_stay_text(served, client):
    encoder = served.generator.encoder
    tags = encoder.grammar.registry.tags
    literal = " ".join(tags)
    turns = [("system", literal), ("user", literal), ("assistant", literal), ("user", literal)]
    prompt = chat_prompt(encoder, turns, None)
    tag_ids = {encoder.tag_ids[t] for t in tags}
    structural = [encoder.tag_ids["<AI>"], encoder.tag_ids["</AI>"], encoder.tag_ids["<AI>"]]
    assert [int(t) for t in prompt.ids if t in tag_ids] == structural  # assistant turn in, out, the lock
    reply = client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": literal}],
                                           max_tokens=4, temperature=0)
    assert reply.usage.prompt_tokens == len(chat_prompt(encoder, [("user", literal)], None).ids) - 1
    completion = client.completions.create(model=served.model, prompt=literal, max_tokens=2, temperature=0)
    plain = encode_prompt(encoder, literal)
    assert completion.usage.prompt_tokens == len(plain.ids) and not np.isin(plain.ids, list(tag_ids)).any()


def test_control_is_accepted_and_an_unknown_one_is_refused(served, client):
    reply = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=4,
                                           extra_body={"control": "good"})
    assert reply.usage.completion_tokens >= 2  # <AI>, <|good|>, then what was generated
    completion = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=2, temperature=0,
                                           extra_body={"control": "good", "mode": "ai"})
    assert completion.choices[0].text.startswith("<AI><|good|>")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=served.model, messages=CHAT, extra_body={"control": "great"})
    error = caught.value.body
    assert error["param"] == "control" and "good" in error["message"] and "bad" in error["message"]


def test_unknown_model_is_404(served, client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt=PROMPT)
    assert caught.value.body["code"] == "model_not_found"


# -- bad requests -----------------------------------------------------------------------------------

LONG = "river " * 400


@pytest.mark.parametrize("path, body, param", [
    ("/completions", b'{"model": ', None),
    ("/completions", b'{"model": "x", "prompt": "\xff\xfe"}', None),
    ("/completions", b"[1, 2]", None),
    ("/completions", b'{"prompt": "a", "temperature": NaN}', None),
    ("/completions", {"prompt": "a", "wibble": 1}, "wibble"),
    ("/completions", {"prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
    ("/completions", {"prompt": "a", "temperature": 3}, "temperature"),
    ("/completions", {"prompt": "a", "temperature": "hot"}, "temperature"),
    ("/completions", {"prompt": "a", "top_p": 0}, "top_p"),
    ("/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("/completions", {"prompt": "a", "n": 100}, "n"),
    ("/completions", {"prompt": "a", "seed": 1.5}, "seed"),
    ("/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/completions", {"prompt": "a", "stop": "x" * 200_000}, "stop"),  # would stall the event loop
    ("/completions", {"prompt": "a" * (5 << 20)}, None),  # a body over 4 MiB: 413
    ("/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/completions", {"prompt": [1, 2, 3]}, "prompt"),
    ("/completions", {"prompt": "a", "mode": "robot"}, "mode"),
    ("/completions", {"prompt": LONG}, None),
    ("/completions", {"prompt": "a", "max_tokens": 10_000}, None),
    ("/chat/completions", {"messages": []}, "messages"),
    ("/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "mode": "human"}, "mode"),
    ("/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, None),
    ("/chat/completions", {"messages": "hi"}, "messages"),
])
def test_bad_requests_are_openai_errors(served, path, body, param):
    if isinstance(body, dict):
        body = {"model": served.model, **body}
    status, raw = _request(served, "POST", f"/v1{path}", body)
    assert 400 <= status < 500, raw
    assert status == 413 or len(raw) < 5 << 20
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"] and error["param"] == param


def test_harmless_fields_are_accepted(served):
    body = {"model": served.model, "prompt": "a", "max_tokens": 1, "user": "u", "logprobs": None, "echo": False,
            "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "best_of": 1, "suffix": None,
            "stream_options": None}
    status, raw = _request(served, "POST", "/v1/completions", body)
    assert status == 200, raw


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/completions", 405), ("POST", "/v1/models", 405), ("GET", "/v1/nothing", 404), ("GET", "/", 404),
])
def test_wrong_paths_and_methods(served, method, path, status):
    got, raw = _request(served, method, path)
    assert got == status
    assert set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}


def test_stream_usage_chunk(served):
    body = {"model": served.model, "prompt": PROMPT, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    status, raw = _request(served, "POST", "/v1/completions", body)
    assert status == 200
    events = raw.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    usage = json.loads(events[-3].removeprefix("data: "))
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


# -- clients that hang up --------------------------------------------------------------------------


def _long_request(served, stream: bool, n: int = 1) -> http.client.HTTPConnection:
    """A chat request with a long budget, sent; the response is not read."""
    body = json.dumps({"model": served.model, "messages": CHAT, "max_tokens": 90, "stream": stream, "n": n})
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    connection.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    return connection


def test_a_client_that_hangs_up_mid_stream_frees_its_rows(served, client):
    _wait_idle(served)
    service = served.app.state.service
    before = service.hangups
    connection = _long_request(served, stream=True)
    response = connection.getresponse()
    assert response.status == 200
    events = 0
    while events < 3:  # the role chunk, then tokens: the row is decoding
        events += response.readline().startswith(b"data: ")
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    _wait_idle(served, seconds=5.0)
    assert service.hangups == before + 1  # cut off while running, and cancelled
    reply = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_client_that_hangs_up_while_waiting_frees_its_rows(served, client):
    """Without streaming: the wait for the reply ends when the client goes (the rows must be
    running when it does; the tiny model is quick, so try a few times)."""
    service = served.app.state.service
    for _ in range(5):
        _wait_idle(served)
        before = service.hangups
        connection = _long_request(served, stream=False, n=4)
        deadline = time.monotonic() + 5.0
        while not served.app.state.engines[0].active_rows and time.monotonic() < deadline:
            time.sleep(0.0005)
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        _wait_idle(served, seconds=5.0)
        if service.hangups > before:
            break
    assert service.hangups == before + 4
    reply = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=3)
    assert reply.choices[0].finish_reason == "length"


def test_a_request_can_hide_thinking_but_never_reveal_what_the_server_hides(served):
    encoder = served.generator.encoder
    body = {"model": served.model, "max_tokens": 4}
    assert parse_sampling({**body, "hide_thinking": False}, encoder, hide_thinking=True).hide_thinking
    assert parse_sampling(body, encoder, hide_thinking=True).hide_thinking
    assert parse_sampling({**body, "hide_thinking": True}, encoder, hide_thinking=False).hide_thinking
    assert not parse_sampling(body, encoder, hide_thinking=False).hide_thinking
