"""The HTTP side of `metatrain serve`: an OpenAI-compatible API (Starlette) over the engine.

Endpoints: `GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions`,
streaming (server-sent events, as OpenAI sends them) or not.

A completion prompt is human-mode text; `mode: "ai"` puts it under the AI-mode lock.
A chat is a `Document`: system and user turns are human text, assistant turns AI text,
and the reply is always generated under the AI-mode lock (`<AI>` ... `</AI>`), so a
client cannot make the model write the human side. Literal tag strings in any text stay
text: the encoder never turns text into tag tokens. `control` conditions the reply on a
control token of the tag registry (`"good"`: `<|good|>`).

Two engines decode: one with the AI-mode lock (chat, and completions with `mode: "ai"`),
where `</AI>` ends a row, and one without (plain completions), where only EOS does.

Replies are rendered from all the ids so far at every step, and only the new suffix is
sent; a trailing U+FFFD (part of a UTF-8 character), text that could begin a stop
string, and a thinking block's text while it could still be the mantra (which
`recover_segments` drops once complete) are held back until more tokens decide them.
A client that hangs up cancels every row of its request, so its slots free at the next
step.

Bad requests get OpenAI's error shape with a 4xx status: `{"error": {"message", "type",
"param", "code"}}`. What a request may ask, and every check of it before its prompt is
encoded, is `metatrain.serve.requests`; this module is the service behind the routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from metatrain.documents import Document, Segment
from metatrain.engine.constraints import TagConstraints
from metatrain.engine.engine import Engine, Handle, RowRequest
from metatrain.errors import UserError
from metatrain.generate.generator import Generator, recover_segments, render_ids
from metatrain.generate.prompts import EncodedPrompt, encode_prompt
from metatrain.serve.requests import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    LOCK_MODE,
    ROLE_MODES,
    RequestError,
    Sampling,
    error_body,
    parse_chat,
    parse_completion,
    read_body,
)
from metatrain.tokenizer.encoder import Encoder

#: `max_tokens` of a completion that gives none (as OpenAI).
DEFAULT_COMPLETION_TOKENS: int = 16

#: Engine finish reasons -> OpenAI's (`cancelled` is a matched stop string).
FINISH_REASONS: Mapping[str, str] = {"eos": "stop", "end_of_mode": "stop", "cancelled": "stop", "length": "length"}


def chat_prompt(encoder: Encoder, messages: Sequence[tuple[str, str]], control: str | None) -> EncodedPrompt:
    """The conversation as a document, encoded for a reply under the AI-mode lock.

    User and system turns are human-mode text segments, assistant turns AI-mode ones;
    empty turns are left out. Tag strings in the text stay text.
    """
    segments = tuple(Segment("text", content, mode=ROLE_MODES[role]) for role, content in messages if content)
    prompt = Document("chat", segments) if segments else ""
    return encode_prompt(encoder, prompt, LOCK_MODE, control)


# -- replies as they grow ------------------------------------------------------------------------

#: `render(ids, final) -> {field: text}`; before `final`, text that may still change is left out.
Renderer = Callable[[Sequence[int], bool], dict[str, str]]


def completion_renderer(encoder: Encoder, start_state: int, hide_thinking: bool) -> Renderer:
    """A completion's `text`: the ids with tags written out (thinking blocks dropped if hidden)."""

    def render(ids: Sequence[int], final: bool) -> dict[str, str]:
        return {"text": render_ids(encoder, ids, start_state, hide_thinking=hide_thinking)}

    return render


def chat_renderer(encoder: Encoder, start_state: int, hide_thinking: bool) -> Renderer:
    """A chat reply's `content` (its text segments) and `reasoning_content` (its thinking,
    the mantra left out; absent when hidden)."""
    mantra = encoder.mantra or ""

    def render(ids: Sequence[int], final: bool) -> dict[str, str]:
        segments = recover_segments(encoder, ids, start_state)
        fields = {"content": "".join(s.text for s in segments if s.kind == "text")}
        if not hide_thinking:
            thinking = [s.text for s in segments if s.kind == "thinking"]
            if not final and thinking and segments[-1].kind == "thinking" and mantra.startswith(thinking[-1]):
                thinking.pop()  # an open block that may still be the mantra, which is then dropped
            fields["reasoning_content"] = "".join(thinking)
        return fields

    return render


class Reply:
    """One choice as its tokens come: its ids, the text sent so far, and stop strings.

    Args:
        render: what the fields are for the ids so far (`Renderer`).
        prefix: ids reported as generated before the engine's (the lock's tags, the control).
        stops: stop strings, matched in `stop_field`.
        stop_field: the field stop strings cut.
    """

    def __init__(self, render: Renderer, prefix: Sequence[int], stops: Sequence[str], stop_field: str):
        self.render, self.stops, self.stop_field = render, tuple(stops), stop_field
        self.ids: list[int] = list(prefix)
        self.sent: dict[str, str] = {}
        self.stopped = False

    def add(self, new: Sequence[int]) -> dict[str, str]:
        """Takes new ids; returns the new text of each field that has some. Sets `stopped`
        (and the fields become final) when a stop string appears."""
        self.ids.extend(new)
        fields = self.render(self.ids, False)
        text = fields.get(self.stop_field, "")
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            fields = self.render(self.ids, True)
            fields[self.stop_field] = text[: min(cuts)]
            return self._advance(fields)
        for name, value in fields.items():
            fields[name] = value.rstrip("\ufffd")  # part of a UTF-8 character
        held = fields.get(self.stop_field, "")
        fields[self.stop_field] = held[: len(held) - self._stop_overlap(held)]
        return self._advance(fields)

    def finish(self) -> dict[str, str]:
        """The rest of the text once the row has ended."""
        return self._advance(self.render(self.ids, True))

    def _stop_overlap(self, text: str) -> int:
        """Length of the longest end of `text` that begins a stop string."""
        return max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    def _advance(self, fields: Mapping[str, str]) -> dict[str, str]:
        delta = {}
        for name, value in fields.items():
            sent = self.sent.get(name, "")
            if len(value) > len(sent):
                delta[name] = value[len(sent):]
                self.sent[name] = sent + delta[name]
            else:
                self.sent.setdefault(name, sent)
        return delta


async def run_choices(handles: Sequence[Handle], replies: Sequence[Reply]
                      ) -> AsyncIterator[tuple[int, dict[str, str], str | None]]:
    """`(choice, new text by field, finish_reason or None)` as the rows produce tokens; each
    choice ends with one item that has its finish reason. Every row is cancelled on the way out
    (a stop string, the end, or the caller going away)."""
    pending = {asyncio.ensure_future(h.next()): i for i, h in enumerate(handles)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                new = task.result()
                if new is None:
                    yield i, replies[i].finish(), FINISH_REASONS[handles[i].finish_reason]
                    continue
                delta = replies[i].add(new)
                if replies[i].stopped:
                    handles[i].cancel()
                    yield i, delta, "stop"
                    continue
                if delta:
                    yield i, delta, None
                pending[asyncio.ensure_future(handles[i].next())] = i
    finally:
        for task in pending:
            task.cancel()
        for handle in handles:
            handle.cancel()


# -- the app ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    """One accepted request: its rows on the engine and how to answer."""

    kind: str  # "chat" or "completion"
    handles: list[Handle]
    replies: list[Reply]
    prompt_tokens: int
    sampling: Sampling
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def usage(self) -> dict[str, int]:
        completion = sum(len(r.ids) for r in self.replies)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


class _EventStream(StreamingResponse):
    """Server-sent events whose rows are cancelled however the response ends, also when the
    client hangs up before the first event."""

    def __init__(self, events: AsyncIterator[str], handles: Sequence[Handle], on_end: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_end()


class Service:
    """The model behind the API: the encoder, two engines and the request handlers.

    Args:
        generator: the loaded model (`Generator.load`).
        model_id: the name clients give as `model`.
        max_batch: rows each engine decodes together.
        hide_thinking: leave thinking out of every reply (a request cannot reveal it).
    """

    def __init__(self, generator: Generator, *, model_id: str, max_batch: int, hide_thinking: bool):
        self.encoder = encoder = generator.encoder
        self.model_config = generator.model_config
        self.model_id, self.hide_thinking = model_id, hide_thinking
        self.created = int(time.time())
        self.hangups = 0  # rows cancelled because their client hung up before they ended
        self._started = False
        self.locked = Engine(generator.params, generator.model_config,
                             TagConstraints.from_encoder(encoder, lock_mode=LOCK_MODE),
                             max_batch=max_batch, eos_id=encoder.eos_id, mesh=generator.mesh)
        self.unlocked = Engine(generator.params, generator.model_config, TagConstraints.from_encoder(encoder),
                               max_batch=max_batch, eos_id=encoder.eos_id, mesh=generator.mesh)

    @property
    def engines(self) -> tuple[Engine, Engine]:
        """(locked, unlocked)."""
        return self.locked, self.unlocked

    async def start(self) -> None:
        """Compile the shortest prompt bucket of both engines, then start their decode threads
        (once: `metatrain serve` starts the service before it listens, and the app again)."""
        if self._started:
            return
        self._started = True
        for engine, lock in ((self.locked, LOCK_MODE), (self.unlocked, None)):
            await asyncio.to_thread(engine.warm_up, encode_prompt(self.encoder, "", lock))
            engine.start()

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()

    # -- endpoints ---------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    def _model_card(self) -> dict[str, Any]:
        """The one model; `max_model_len` is its context in tokens (prompt and reply), as vLLM
        reports it, so a client can check its `max_tokens` before asking."""
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "metatrain",
                "max_model_len": self.model_config.max_seq_len}

    async def completions(self, request: Request) -> Response:
        body = await read_body(request, COMPLETION_FIELDS, self.model_id)
        asked = parse_completion(body, self.encoder, hide_thinking=self.hide_thinking)
        sampling = asked.sampling
        encoded = encode_prompt(self.encoder, asked.prompt, asked.lock, sampling.control)
        engine = self.locked if asked.lock else self.unlocked
        render = completion_renderer(self.encoder, encoded.prompt_state, sampling.hide_thinking)
        job = self._submit("completion", engine, encoded, sampling, render, "text", DEFAULT_COMPLETION_TOKENS)
        return await self._answer(request, job)

    async def chat(self, request: Request) -> Response:
        body = await read_body(request, CHAT_FIELDS, self.model_id)
        asked = parse_chat(body, self.encoder, hide_thinking=self.hide_thinking)
        sampling = asked.sampling
        encoded = chat_prompt(self.encoder, asked.messages, sampling.control)
        render = chat_renderer(self.encoder, encoded.prompt_state, sampling.hide_thinking)
        job = self._submit("chat", self.locked, encoded, sampling, render, "content", None)
        return await self._answer(request, job)

    # -- the work ------------------------------------------------------------------------------
    def _submit(self, kind: str, engine: Engine, encoded: EncodedPrompt, sampling: Sampling, render: Renderer,
                stop_field: str, default_tokens: int | None) -> _Job:
        room = self.model_config.max_seq_len - len(encoded.ids)
        budget = sampling.max_tokens
        if budget is None:
            budget = max(1, room if default_tokens is None else min(default_tokens, room))
        rows = [RowRequest(encoded, budget, sampling.temperature, sampling.top_p, (sampling.seed + i) % 2**32)
                for i in range(sampling.n)]
        for row in rows:
            engine.check(row)  # all or none
        handles = [engine.submit(row) for row in rows]
        replies = [Reply(render, encoded.prefix, sampling.stop, stop_field) for _ in rows]
        return _Job(kind, handles, replies, len(encoded.ids) - len(encoded.prefix), sampling)

    async def _answer(self, request: Request, job: _Job) -> Response:
        if job.sampling.stream:
            return _EventStream(self._events(job), job.handles, lambda: self._release(job))
        work = asyncio.ensure_future(self._collect(job))
        hangup = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            if not work.done():
                work.cancel()  # the client has gone (or this task is cancelled)
            self._release(job)
        if work.cancelled():
            return Response(status_code=499)  # nobody reads it
        return JSONResponse(work.result())

    def _release(self, job: _Job) -> None:
        """Cancel every row of `job` (its answer is done, or its client has gone), counting
        those still running in `hangups`."""
        for handle, reply in zip(job.handles, job.replies):
            if handle.finish_reason is None and not reply.stopped:
                self.hangups += 1
            handle.cancel()

    async def _collect(self, job: _Job) -> dict[str, Any]:
        reasons: dict[int, str] = {}
        async with contextlib.aclosing(run_choices(job.handles, job.replies)) as items:
            async for i, _, reason in items:
                if reason is not None:
                    reasons[i] = reason
        choices = []
        for i, reply in enumerate(job.replies):
            if job.kind == "chat":
                message = {"role": "assistant", "content": reply.sent.get("content", "")}
                message["reasoning_content"] = None if job.sampling.hide_thinking else reply.sent.get(
                    "reasoning_content", "")
                choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": reasons[i]})
            else:
                choices.append({"index": i, "text": reply.sent.get("text", ""), "logprobs": None,
                                "finish_reason": reasons[i]})
        return {"id": self._id(job), "object": "chat.completion" if job.kind == "chat" else "text_completion",
                "created": job.created, "model": self.model_id, "choices": choices, "usage": job.usage()}

    def _id(self, job: _Job) -> str:
        return f"{'chatcmpl' if job.kind == 'chat' else 'cmpl'}-{job.id}"

    async def _events(self, job: _Job) -> AsyncIterator[str]:
        chat = job.kind == "chat"
        head = {"id": self._id(job), "object": "chat.completion.chunk" if chat else "text_completion",
                "created": job.created, "model": self.model_id}
        if job.sampling.include_usage:
            head["usage"] = None

        def chunk(i: int, delta: Mapping[str, str], reason: str | None) -> str:
            if chat:
                choice = {"index": i, "delta": dict(delta), "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": i, "text": delta.get("text", ""), "logprobs": None, "finish_reason": reason}
            return _event({**head, "choices": [choice]})

        if chat:
            for i in range(len(job.handles)):
                yield chunk(i, {"role": "assistant", "content": ""}, None)
        try:
            async with contextlib.aclosing(run_choices(job.handles, job.replies)) as items:
                async for i, delta, reason in items:
                    if delta:
                        yield chunk(i, delta, None)
                    if reason is not None:
                        yield chunk(i, {}, reason)
        except Exception as e:  # noqa: BLE001 - the status is sent: the stream reports it
            yield _event(error_body(f"generation failed: {e}", kind="server_error"))
            return
        if job.sampling.include_usage:
            yield _event({**head, "choices": [], "usage": job.usage()})
        yield "data: [DONE]\n\n"


def _event(payload: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _disconnected(request: Request) -> None:
    """Returns once the client has hung up (the body has been read: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- errors ----------------------------------------------------------------------------------------


async def _request_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, RequestError)
    return JSONResponse(error_body(e.message, param=e.param, code=e.code), status_code=e.status)


async def _user_error(request: Request, e: Exception) -> Response:
    return JSONResponse(error_body(str(e), code="invalid_value"), status_code=400)


async def _http_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {404: f"no such endpoint: {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
    return JSONResponse(error_body(message, code=codes.get(e.status_code)), status_code=e.status_code,
                        headers=e.headers)


async def _client_gone(request: Request, e: Exception) -> Response:
    return Response(status_code=499)  # the client hung up while sending: nobody reads this


async def _server_error(request: Request, e: Exception) -> Response:
    return JSONResponse(error_body(f"the server failed: {type(e).__name__}: {e}", kind="server_error"),
                        status_code=500)


def create_app(generator: Generator, *, model_id: str, max_batch: int = 8, hide_thinking: bool = False) -> Starlette:
    """The ASGI app serving `generator` as `model_id`; its lifespan starts and stops the
    engines. `app.state.service` is the `Service`, `app.state.engines` its engines."""
    service = Service(generator, model_id=model_id, max_batch=max_batch, hide_thinking=hide_thinking)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            service.stop()

    app = Starlette(
        routes=[
            Route("/v1/models", service.models, methods=["GET"]),
            Route("/v1/completions", service.completions, methods=["POST"]),
            Route("/v1/chat/completions", service.chat, methods=["POST"]),
        ],
        exception_handlers={RequestError: _request_error, UserError: _user_error, HTTPException: _http_error,
                            ClientDisconnect: _client_gone, Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.engines = service.engines
    return app
