"""OpenAI request bodies in, typed requests out: everything `metatrain serve` checks before
it encodes a prompt, and the error shape of the answers it refuses.

    read_body           the body of an HTTP request, read (bounded), parsed, its fields and model checked
    parse_completion    `POST /v1/completions` -> `CompletionRequest`
    parse_chat          `POST /v1/chat/completions` -> `ChatRequest`
    parse_sampling      the sampling fields both share -> `Sampling`
    RequestError        a refusal, answered as OpenAI answers it, with its 4xx status
    error_body          OpenAI's error object

A field this server does not know is refused (`unknown_parameter`); a few that clients
commonly send (`HARMLESS_FIELDS`) are accepted at the values that change nothing. Bad
requests get OpenAI's error shape with a 4xx status: `{"error": {"message", "type",
"param", "code"}}`.

The service, its engines and what a reply sends back are `metatrain.serve.app`; how a
chat becomes a prompt (`chat_prompt`) is there too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from starlette.requests import Request

from metatrain.errors import UserError
from metatrain.generate.prompts import check_prompt_text, control_id
from metatrain.tokenizer.encoder import Encoder

#: Most choices (`n`) one request may ask for.
MAX_CHOICES: int = 8
#: Most stop strings one request may give (as OpenAI).
MAX_STOP: int = 4
#: Longest stop string: matching one costs its length squared per step, on the event loop.
MAX_STOP_CHARS: int = 256
#: Largest request body read (a prompt longer than the context is refused anyway).
MAX_BODY_BYTES: int = 4 << 20
#: The lock under which chat replies (and `mode: "ai"` completions) are generated.
LOCK_MODE: str = "ai"

_SAMPLING_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream",
                              "control", "mode", "hide_thinking"})
COMPLETION_FIELDS: frozenset[str] = _SAMPLING_FIELDS | {"prompt"}
CHAT_FIELDS: frozenset[str] = _SAMPLING_FIELDS | {"messages", "max_completion_tokens"}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


#: Fields clients commonly send that change nothing at these values: accepted and ignored
#: (null always is). Any other value of them is refused.
HARMLESS_FIELDS: Mapping[str, tuple[str, Callable[[Any], bool]]] = {
    "user": ("a string", lambda v: isinstance(v, str)),
    "logprobs": ("false", lambda v: v is False),
    "echo": ("false", lambda v: v is False),
    "presence_penalty": ("0", lambda v: _is_number(v) and v == 0),
    "frequency_penalty": ("0", lambda v: _is_number(v) and v == 0),
    "stream_options": ('{"include_usage": true|false}',
                       lambda v: isinstance(v, dict) and set(v) <= {"include_usage"}
                       and isinstance(v.get("include_usage", False), bool)),
    "logit_bias": ("{}", lambda v: v == {}),
    "best_of": ("1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v == 1),
    "suffix": ("null", lambda v: False),
}

#: Chat roles and the mode their turns are written in.
ROLE_MODES: Mapping[str, str] = {"system": "human", "developer": "human", "user": "human", "assistant": "ai"}


class RequestError(Exception):
    """A request the API refuses, answered as OpenAI answers it.

    Args:
        message: what is wrong and how to fix it.
        param: the request field at fault (None: the request as a whole).
        code: OpenAI's machine-readable code (`invalid_value`, `unknown_parameter`, ...).
        status: the HTTP status (4xx).
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = "invalid_value",
                 status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- reading requests --------------------------------------------------------------------------


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (RequestError when it is not one)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"the request body is not UTF-8 (byte 0x{raw[e.start]:02x} at {e.start})",
                           code="invalid_json") from None

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        body = json.loads(text, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}",
                           code="invalid_type")
    return body


def check_fields(body: Mapping[str, Any], known: frozenset[str]) -> None:
    """Refuses fields this endpoint does not know, and harmless ones at a value that is not."""
    for name, value in body.items():
        if name in known:
            continue
        if name in HARMLESS_FIELDS:
            what, harmless = HARMLESS_FIELDS[name]
            if value is not None and not harmless(value):
                raise RequestError(f"{name} is not supported here: give {what} or leave it out", name,
                                   "unsupported_value")
            continue
        raise RequestError(f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")


def _int(body: Mapping[str, Any], name: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(f"{name} must be an integer, got {json.dumps(value)}", name, "invalid_type")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise RequestError(f"{name} must be {bounds}, got {value}", name)
    return value


def _float(body: Mapping[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {json.dumps(value)}", name, "invalid_type")
    return float(value)


def _bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {json.dumps(value)}", name, "invalid_type")
    return value


def _text(value: Any, param: str) -> str:
    """`value` if it is a string UTF-8 can carry (no lone surrogates)."""
    if not isinstance(value, str):
        raise RequestError(f"{param} must be a string, got {json.dumps(value)}", param, "invalid_type")
    try:
        return check_prompt_text(value)
    except UserError as e:
        raise RequestError(str(e), param) from None


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The sampling fields common to both endpoints, checked.

    Attributes:
        max_tokens: token budget per choice (None: the endpoint's default).
        temperature: 0..2 (0: greedy).
        top_p: nucleus mass in (0, 1].
        n: choices.
        seed: seed of the first choice (the i-th gets seed + i).
        stop: stop strings (up to `MAX_STOP`).
        stream: answer with server-sent events.
        include_usage: when streaming, send a last chunk with the usage.
        control: control name, or None.
        hide_thinking: leave thinking out of the reply.
    """

    max_tokens: int | None
    temperature: float
    top_p: float
    n: int
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    control: str | None
    hide_thinking: bool


def parse_sampling(body: Mapping[str, Any], encoder: Encoder, *, hide_thinking: bool,
                   max_tokens_fields: Sequence[str] = ("max_tokens",)) -> Sampling:
    """The sampling fields of `body` (RequestError for a wrong type or value).

    Args:
        hide_thinking: the server's `--hide-thinking`: when set, thinking is hidden whatever
            the request says (a request may only add `hide_thinking: true`).
        max_tokens_fields: the fields that name the budget (the first given wins).
    """
    max_tokens = None
    for name in max_tokens_fields:
        max_tokens = _int(body, name, 1)
        if max_tokens is not None:
            break
    temperature = _float(body, "temperature", 1.0)
    if not 0.0 <= temperature <= 2.0:
        raise RequestError(f"temperature must be between 0 and 2, got {temperature}", "temperature")
    top_p = _float(body, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise RequestError(f"top_p must be greater than 0 and at most 1, got {top_p}", "top_p")
    n = _int(body, "n", 1, MAX_CHOICES)
    seed = _int(body, "seed")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= MAX_STOP:
        stops = tuple(stop)
    else:
        raise RequestError(f"stop must be a string or a list of at most {MAX_STOP} strings", "stop", "invalid_type")
    if any(s == "" for s in stops):
        raise RequestError("a stop string must not be empty", "stop")
    stops = tuple(_text(s, "stop") for s in stops)
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise RequestError(f"a stop string may have at most {MAX_STOP_CHARS} characters", "stop")
    control = body.get("control")
    if control is not None:
        _text(control, "control")
        try:
            control_id(encoder, control)
        except UserError as e:
            raise RequestError(str(e), "control") from None
    options = body.get("stream_options") or {}
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        n=1 if n is None else n,
        seed=secrets.randbits(31) if seed is None else seed,
        stop=stops,
        stream=_bool(body, "stream", False),
        include_usage=bool(options.get("include_usage", False)),
        control=control,
        # A request can hide thinking, never reveal what the server hides (`--hide-thinking`).
        hide_thinking=hide_thinking or _bool(body, "hide_thinking", False),
    )


def parse_messages(value: Any) -> list[tuple[str, str]]:
    """A chat's `messages` as `(role, content)` pairs (RequestError when malformed).

    Content is a string or a list of `{"type": "text", "text": ...}` parts (joined).
    """
    if not isinstance(value, list):
        raise RequestError("messages must be a list of {role, content} objects", "messages", "invalid_type")
    if not value:
        raise RequestError("messages must not be empty", "messages")
    out = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{param} must be an object with role and content", param, "invalid_type")
        for key in message:
            if key not in ("role", "content", "name"):
                raise RequestError(f"{param}.{key} is not supported (give role and content)", f"{param}.{key}",
                                   "unknown_parameter")
        role = message.get("role")
        if role not in ROLE_MODES:
            raise RequestError(f"{param}.role must be one of {', '.join(ROLE_MODES)}, got {json.dumps(role)}",
                               f"{param}.role")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                where = f"{param}.content[{j}]"
                if not isinstance(part, dict) or part.get("type") != "text" or set(part) != {"type", "text"}:
                    raise RequestError(f"{where} must be a text part, {{\"type\": \"text\", \"text\": ...}}",
                                       where, "invalid_type")
                parts.append(_text(part["text"], f"{where}.text"))
            content = "".join(parts)
        out.append((role, _text(content, f"{param}.content")))
    return out



@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """A checked `POST /v1/completions` body.

    Attributes:
        prompt: the prompt, human-mode text.
        lock: `LOCK_MODE` for `mode: "ai"` (the prompt and reply under the AI-mode lock),
            None for plain text.
        sampling: the sampling fields.
    """

    prompt: str
    lock: str | None
    sampling: Sampling


def parse_completion(body: Mapping[str, Any], encoder: Encoder, *, hide_thinking: bool) -> CompletionRequest:
    """A completion request from its body (RequestError for a missing, wrong or unknown value).

    Args:
        body: the body, its fields checked (`read_body`).
        encoder: the model's encoder (to check `control`).
        hide_thinking: the server's `--hide-thinking`.
    """
    sampling = parse_sampling(body, encoder, hide_thinking=hide_thinking)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise RequestError("prompt must be one string (a list of exactly one is accepted)", "prompt")
        (prompt,) = prompt
    if prompt is None:
        raise RequestError("you must provide a prompt", "prompt", "missing_required_parameter")
    prompt = _text(prompt, "prompt")
    mode = body.get("mode")
    if mode not in (None, "human", LOCK_MODE):
        raise RequestError(f'mode must be "human" or "{LOCK_MODE}", got {json.dumps(mode)}', "mode")
    return CompletionRequest(prompt, LOCK_MODE if mode == LOCK_MODE else None, sampling)


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """A checked `POST /v1/chat/completions` body.

    Attributes:
        messages: the conversation as `(role, content)` pairs (`parse_messages`).
        sampling: the sampling fields (`max_completion_tokens` wins over `max_tokens`).
    """

    messages: tuple[tuple[str, str], ...]
    sampling: Sampling


def parse_chat(body: Mapping[str, Any], encoder: Encoder, *, hide_thinking: bool) -> ChatRequest:
    """A chat request from its body (RequestError for a missing, wrong or unknown value).

    Args:
        body: the body, its fields checked (`read_body`).
        encoder: the model's encoder (to check `control`).
        hide_thinking: the server's `--hide-thinking`.
    """
    sampling = parse_sampling(body, encoder, hide_thinking=hide_thinking,
                              max_tokens_fields=("max_completion_tokens", "max_tokens"))
    if body.get("mode") not in (None, LOCK_MODE):
        raise RequestError(f'a chat reply is always in AI mode: mode may only be "{LOCK_MODE}", '
                           f'got {json.dumps(body.get("mode"))}', "mode")
    if "messages" not in body:
        raise RequestError("you must provide messages", "messages", "missing_required_parameter")
    return ChatRequest(tuple(parse_messages(body["messages"])), sampling)


async def read_body(request: Request, fields: frozenset[str], model_id: str) -> dict[str, Any]:
    """The JSON object an HTTP request sends, read up to `MAX_BODY_BYTES`, its fields checked.

    Args:
        request: the HTTP request.
        fields: the fields the endpoint knows (`COMPLETION_FIELDS`, `CHAT_FIELDS`).
        model_id: the one model this server serves; the body must name it.

    Raises:
        RequestError: the body is too large (413), not a JSON object, has a field the
            endpoint does not know, or names no model or another one (404).
    """
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError(f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB", None,
                               "request_too_large", status=413)
    body = parse_body(bytes(raw))
    check_fields(body, fields)
    model = body.get("model")
    if model is None:
        raise RequestError("you must provide a model parameter", "model", "missing_required_parameter")
    if model != model_id:
        raise RequestError(f"The model {json.dumps(model)} does not exist; this server serves "
                           f"{json.dumps(model_id)}", "model", "model_not_found", status=404)
    return body
