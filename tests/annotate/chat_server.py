"""A real OpenAI-compatible chat server on 127.0.0.1, for tests and the annotate benchmark.

`ChatServer` serves `POST /v1/chat/completions` with a plain ASGI app under uvicorn, in a
background thread, on a port the OS picks. Replies are scripted: by default each one is
derived from the request (a hash of the last user message), so a run is reproducible;
`reply` and `faults` replace or break them (`Fault`: an HTTP status, a timeout, a
malformed body, a dropped connection, an empty reply). The server records every request
(body and headers) and the most requests it ever had in flight at once.

    with ChatServer(latency=0.2, faults={0: Fault("status", 503)}) as server:
        client = AsyncOpenAI(base_url=server.base_url, api_key="unused")
        ...
        assert server.max_in_flight >= 8

What does not live here: the client (`metatrain.annotate.openai_chat`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import uvicorn

FAULT_KINDS = ("status", "timeout", "malformed", "close", "empty", "trickle")


@dataclasses.dataclass(frozen=True)
class Fault:
    """One way for the server to answer badly.

    Attributes:
        kind: `status` (an error response with `status`), `timeout` (answer nothing for
            `seconds`, longer than the client's timeout; the wait ends early when the
            client hangs up), `malformed` (a 200 whose body is `body`, by default JSON cut
            short), `close` (drop the connection without a response), `empty` (a normal
            completion whose content is "") or `trickle` (a 200 whose body is sent one
            byte every `seconds`, so no single read ever waits long).
        status: the HTTP status of a `status` fault.
        retry_after_ms: sent as `retry-after-ms` with a `status` fault (None: no header).
            The openai client honours it, so retries in tests take milliseconds; it ignores
            `Retry-After: 0` and backs off 0.5 s and more instead.
        seconds: how long a `timeout` fault waits.
        body: the body of a `malformed` fault (bytes), or the JSON of a `status` fault.
        echo_headers: a `status` fault's error message repeats the request's headers
            (the test that API keys never leak uses it).
    """

    kind: str
    status: int = 500
    retry_after_ms: int | None = 10
    seconds: float = 10.0
    body: Any = None
    echo_headers: bool = False

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"Fault kind {self.kind!r} is not one of {', '.join(FAULT_KINDS)}")


#: `reply(request_json)`: the thought (str) or a `Fault`.
ReplyFn = Callable[[dict[str, Any]], "str | Fault"]
#: `faults(index, request_json)`: a `Fault` for the index-th request (from 0), or None.
FaultFn = Callable[[int, dict[str, Any]], "Fault | None"]


def last_user_message(body: Mapping[str, Any]) -> str:
    """The content of the last `user` message of a chat request ("" when there is none)."""
    for message in reversed(body.get("messages") or []):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return str(message.get("content") or "")
    return ""


def default_reply(body: Mapping[str, Any]) -> str:
    """A thought derived from the request alone: the same request always gets the same one."""
    digest = hashlib.sha256(last_user_message(body).encode()).hexdigest()[:12]
    return f"  Thinking about {digest}: the next step follows from what came before.\n"


def count_words(text: str) -> int:
    """Stand-in token count: whitespace-separated words."""
    return len(text.split())


class ChatServer:
    """An OpenAI-compatible chat-completions server in a background thread.

    Args:
        reply: `reply(request_json) -> str | Fault`; default `default_reply`.
        latency: seconds every answer waits first (asyncio.sleep, so requests overlap).
        faults: `{index: Fault}` for the index-th request received (from 0), or a
            callable `(index, request_json) -> Fault | None` (to key faults on a document,
            match its text in the messages). Applied before `reply`.
        models: the `data` of `GET /v1/models` (model cards, e.g. with vLLM's
            `max_model_len`); None: that path is a 404, as on servers that list nothing.
    """

    def __init__(
        self,
        reply: ReplyFn | None = None,
        latency: float = 0.0,
        faults: Mapping[int, Fault] | FaultFn | None = None,
        models: list[dict[str, Any]] | None = None,
    ):
        self.reply = reply or default_reply
        self.models = models
        self.latency = latency
        self.faults = faults
        self._lock = threading.Lock()
        self._bodies: list[dict[str, Any]] = []
        self._headers: list[dict[str, str]] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port = 0

    # -- what tests read ---------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT/v1`, what an OpenAI client takes as `base_url`."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The parsed JSON body of every request received, in order (a copy)."""
        with self._lock:
            return list(self._bodies)

    @property
    def headers(self) -> list[dict[str, str]]:
        """The headers of every request received (names lower-cased), in order (a copy)."""
        with self._lock:
            return list(self._headers)

    @property
    def max_in_flight(self) -> int:
        """The most requests the server was answering at the same time."""
        with self._lock:
            return self._max_in_flight

    # -- lifetime ----------------------------------------------------------------------

    def start(self) -> ChatServer:
        """Serve on a free port; return once the port accepts connections."""
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            http="h11",  # `close` faults reach into the h11 connection; httptools may be absent
            interface="asgi3",  # uvicorn's guess takes a bound method for ASGI2
            lifespan="off",
            proxy_headers=False,
            log_level="critical",
            # No logging.config.dictConfig: it would close every existing handler, pytest's
            # log capture among them ("I/O operation on closed file" in later tests).
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="chat-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10.0
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the test chat server did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Stop serving (quickly: waiting answers end when their clients hang up)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- the ASGI app ------------------------------------------------------------------

    async def _app(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        raw = await _read_body(receive)
        if self.models is not None and scope["method"] == "GET" and scope["path"].rstrip("/") == "/v1/models":
            await _send(send, 200, {"object": "list", "data": self.models})
            return
        if scope["method"] != "POST" or scope["path"].rstrip("/") != "/v1/chat/completions":
            await _send(send, 404, _error_body("not found", "not_found"))
            return
        try:
            body = json.loads(raw)
        except ValueError:
            await _send(send, 400, _error_body("request body is not JSON", "invalid_request_error"))
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        with self._lock:
            index = len(self._bodies)
            self._bodies.append(body)
            self._headers.append(headers)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            await self._answer(index, body, headers, scope, receive, send)
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _answer(self, index, body, headers, scope, receive, send) -> None:
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        fault = self._fault_for(index, body)
        content = None
        if fault is None:
            answer = self.reply(body)
            if isinstance(answer, Fault):
                fault = answer
            else:
                content = answer
        if fault is None or fault.kind == "empty":
            await _send(send, 200, _completion(body, content or ""))
        elif fault.kind == "status":
            await self._send_status_fault(send, fault, headers)
        elif fault.kind == "malformed":
            malformed = b'{"id": "chatcmpl-broken", "choices": [{"mess' if fault.body is None else fault.body
            await _send(send, 200, malformed)
        elif fault.kind == "timeout":
            await _wait_for_disconnect(receive, fault.seconds)
        elif fault.kind == "close":
            await self._drop_connection(scope, receive, send)
        elif fault.kind == "trickle":
            await _trickle(send, json.dumps(_completion(body, "A thought sent slowly.")).encode(), fault.seconds)

    def _fault_for(self, index: int, body: dict[str, Any]) -> Fault | None:
        if self.faults is None:
            return None
        if callable(self.faults):
            return self.faults(index, body)
        return self.faults.get(index)

    async def _send_status_fault(self, send: Callable, fault: Fault, headers: dict[str, str]) -> None:
        if fault.body is not None:
            payload = fault.body
        else:
            message = f"scripted failure (HTTP {fault.status})"
            if fault.echo_headers:
                message += f"; request headers: {headers}"
            payload = _error_body(message, "server_error")
        extra = [] if fault.retry_after_ms is None else [(b"retry-after-ms", str(fault.retry_after_ms).encode())]
        await _send(send, fault.status, payload, extra)

    async def _drop_connection(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        """Close the TCP connection before any byte of a response.

        ASGI cannot close a connection, and uvicorn answers 500 when an app fails before
        responding, so find this request's connection among the server's and close its
        transport. Uvicorn then sees the client gone and sends nothing. Failing that,
        start a response and abandon it: uvicorn closes the connection mid-response.
        """
        client = tuple(scope.get("client") or ())
        server = self._server
        for connection in list(server.server_state.connections if server else ()):
            if getattr(connection, "client", None) == client:
                connection.transport.close()
                await _wait_for_disconnect(receive, 5.0)
                return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
        raise ConnectionAbortedError("scripted dropped connection")


async def _read_body(receive: Callable) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _wait_for_disconnect(receive: Callable, seconds: float) -> None:
    """Wait `seconds`, or until the client hangs up (uvicorn then sends `http.disconnect`)."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    try:
        await asyncio.wait_for(disconnected(), timeout=seconds)
    except asyncio.TimeoutError:
        pass


async def _trickle(send: Callable, data: bytes, seconds: float) -> None:
    """A 200 whose body comes one byte every `seconds` (ends when the client hangs up)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for i in range(len(data)):
        await asyncio.sleep(seconds)
        await send({"type": "http.response.body", "body": data[i:i + 1], "more_body": i + 1 < len(data)})


async def _send(send: Callable, status: int, payload: Any, extra_headers: list | None = None) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": data})


def _error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _completion(body: Mapping[str, Any], content: str) -> dict[str, Any]:
    """A `chat.completion` object, as the OpenAI API returns it."""
    prompt_tokens = sum(count_words(str(m.get("content") or "")) for m in body.get("messages") or [])
    completion_tokens = count_words(content)
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]
    return {
        "id": f"chatcmpl-{digest}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model", "")),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
