"""The `openai` generator: thoughts from any OpenAI-compatible chat-completions server.

One `POST {base_url}/chat/completions` per `ThinkRequest`, through the official `openai`
package's `AsyncOpenAI` client, so the OpenAI API, vLLM, llama.cpp, SGLang and the like
all work. The API key comes from `OPENAI_API_KEY` (a placeholder when unset: local servers
need none) and never appears in a reason, a log line or `settings`.

Retries: the client's own. In `openai/_base_client.py` (read in openai 3.57.0),
`AsyncAPIClient.request` retries timeouts and connection errors (`timeout_exceptions()`,
`request_exceptions()`), and `_should_retry` retries HTTP 408, 409, 429 and >= 500
(unless `x-should-retry: false`); `_calculate_retry_timeout` waits what `retry-after-ms` / `Retry-After` say when that is
in (0, 120] s, else 0.5 s * 2**n (at most 8 s) less up to 25 % jitter. A 200 whose body is
not JSON, or lacks `choices`, is not retried there, so `think` retries it itself, from
the same budget: `max_retries + 1` attempts in all.

What does not live here: the interface (`generators.py`), the CLI (`metatrain annotate`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import urllib.parse
from collections.abc import Mapping
from typing import Any

from metatrain.annotate.generators import GenerationError, ThinkReply, ThinkRequest, register_generator
from metatrain.errors import UserError

#: What the client sends as the key when OPENAI_API_KEY is unset (vLLM, llama.cpp need none).
PLACEHOLDER_API_KEY = "unused"
#: The backoff of our own retries after a malformed reply (the client's own constants).
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0


class MalformedReply(Exception):
    """A 200 response that is not a chat completion; the message is safe to print."""


class OpenAIChatGenerator:
    """A `ThoughtGenerator` that asks an OpenAI-compatible server.

    Args:
        base_url: the API root, e.g. `http://localhost:8000/v1` (the request goes to
            `{base_url}/chat/completions`).
        model: the model name the server knows.
        temperature, top_p, max_tokens: sampling settings, sent with every request.
        timeout: seconds a request may take (connect, and each read), before a retry.
        max_retries: retries after the first attempt, for any failure that can pass.
        send_seed: send `seed` (the request's seed, reduced to 31 bits, which every server
            that takes a seed accepts). The OpenAI API, vLLM and llama.cpp take it; turn it
            off for a server that refuses unknown fields.
        extra_body: more fields for the request body (e.g. `{"top_k": 20}` for vLLM).
        retry_delay: first backoff of the retries after a malformed reply, in seconds.
        api_key: the key; default `OPENAI_API_KEY`, else a placeholder.
    """

    kind = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        temperature: float = 0.7,
        top_p: float = 1.0,
        max_tokens: int = 256,
        timeout: float = 60.0,
        max_retries: int = 4,
        send_seed: bool = True,
        extra_body: Mapping[str, Any] | None = None,
        retry_delay: float = INITIAL_RETRY_DELAY,
        api_key: str | None = None,
    ):
        from openai import AsyncOpenAI  # here, not at the top: `import openai` takes ~0.4 s

        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.temperature = temperature
        self.top_p = top_p
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.max_retries = max_retries
        self.send_seed = send_seed
        self.extra_body = dict(extra_body or {})
        self.retry_delay = retry_delay
        self._where = f"POST {redact_url(self.base_url)}/chat/completions"
        self._client: AsyncOpenAI = AsyncOpenAI(
            base_url=self.base_url,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or PLACEHOLDER_API_KEY,
            timeout=timeout,
            max_retries=max_retries,
        )

    @property
    def settings(self) -> dict[str, Any]:
        """Provenance: where the thoughts came from and how they were sampled (no key)."""
        settings: dict[str, Any] = {
            "base_url": redact_url(self.base_url),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
        }
        if self.extra_body:
            settings["extra_body"] = dict(self.extra_body)
        return settings

    async def think(self, request: ThinkRequest) -> ThinkReply:
        """One chat completion for `request`; its content, stripped, is the thought.

        Raises:
            GenerationError: after `max_retries + 1` attempts, or at once for an error
                that retrying cannot fix (e.g. HTTP 400, 401, 404).
        """
        import openai

        attempts = 0  # across the client's retries and ours
        while True:
            retries_left = self.max_retries - attempts
            client = self._client if attempts == 0 else self._client.with_options(max_retries=retries_left)
            try:
                raw = await client.chat.completions.with_raw_response.create(**self._request_body(request))
            except openai.OpenAIError as err:
                raise GenerationError(f"{self._where}: {self._failure(err, attempts, retries_left)}") from None
            attempts += getattr(raw, "retries_taken", 0) + 1  # absent in old openai releases
            try:
                return parse_completion(raw.http_response.content)
            except MalformedReply as err:
                if attempts > self.max_retries:
                    raise GenerationError(f"{self._where}: {err} after {_plural(attempts)}") from None
                delay = min(self.retry_delay * 2.0 ** (attempts - 1), MAX_RETRY_DELAY)
                await asyncio.sleep(delay * (1 - 0.25 * random.random()))

    def _failure(self, err: Exception, attempts: int, retries_left: int) -> str:
        """Why the client gave up, from the error's type and status alone.

        Never from its text: an error body may echo the request, Authorization included.
        """
        import openai

        if isinstance(err, openai.APIStatusError):
            attempts += _attempts_made(err.response.request)  # 4xx other than 408/409/429 are not retried
            return f"HTTP {err.status_code} after {_plural(attempts)}"
        attempts += retries_left + 1  # the client retried these until its budget ran out
        if isinstance(err, openai.APITimeoutError):
            return f"timed out (after {self.timeout:g} s) after {_plural(attempts)}"
        if isinstance(err, openai.APIConnectionError):
            cause = type(err.__cause__).__name__ if err.__cause__ else "connection error"
            return f"connection failed ({cause}) after {_plural(attempts)}"
        return type(err).__name__  # a client-side check, before any request

    def _request_body(self, request: ThinkRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(message) for message in request.messages],
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
        }
        if self.send_seed:
            body["seed"] = request.seed & 0x7FFFFFFF
        if self.extra_body:
            body["extra_body"] = dict(self.extra_body)
        return body

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self._client.close()


def parse_completion(content: bytes) -> ThinkReply:
    """The thought and token counts of a chat-completion response body.

    Raises:
        MalformedReply: the body is not JSON or not a chat completion.
    """
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        raise MalformedReply("the response is not JSON") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedReply("the response has no choices")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise MalformedReply("the response's first choice has no message")
    text = message.get("content")
    if text is not None and not isinstance(text, str):
        raise MalformedReply("the response's message content is not text")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return ThinkReply(
        text=(text or "").strip(),
        tokens_in=_count(usage.get("prompt_tokens")),
        tokens_out=_count(usage.get("completion_tokens")),
    )


def redact_url(url: str) -> str:
    """`url` without user:password and query (where keys sometimes hide)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _attempts_made(http_request: Any) -> int:
    """How many attempts the client made: it numbers them in `x-stainless-retry-count`."""
    try:
        return int(http_request.headers.get("x-stainless-retry-count", "0")) + 1
    except (AttributeError, ValueError):
        return 1


def _plural(attempts: int) -> str:
    return f"{attempts} attempt" if attempts == 1 else f"{attempts} attempts"


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def add_openai_options(parser: argparse.ArgumentParser) -> None:
    """Add the `openai` generator's flags to `parser` (read back by `build_openai_generator`)."""
    group = parser.add_argument_group("openai generator (any OpenAI-compatible server; key in OPENAI_API_KEY)")
    group.add_argument("--base-url", metavar="URL", help="API root, e.g. http://localhost:8000/v1")
    group.add_argument("--model", metavar="NAME", help="model name the server knows")
    group.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling top-p (default 1.0)")
    group.add_argument("--max-tokens", type=int, default=256, help="most tokens per thought (default 256)")
    group.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    group.add_argument("--max-retries", type=int, default=4, help="retries per request (default 4)")
    group.add_argument(
        "--extra-body", metavar="JSON", default=None, help='more request fields, e.g. \'{"top_k": 20}\''
    )
    group.add_argument(
        "--no-seed", dest="send_seed", action="store_false", help="do not send a per-request seed"
    )


@register_generator("openai")
def build_openai_generator(args: argparse.Namespace) -> OpenAIChatGenerator:
    """The `openai` generator from the CLI's options (see `add_openai_options`)."""
    required = (("--base-url", "base_url"), ("--model", "model"))
    missing = [flag for flag, name in required if not getattr(args, name, None)]
    if missing:
        raise UserError(
            f"--generator openai needs {' and '.join(missing)} (e.g. --base-url http://localhost:8000/v1 --model NAME)"
        )
    for flag, name, low in (("--max-tokens", "max_tokens", 1), ("--max-retries", "max_retries", 0)):
        if getattr(args, name, low) < low:
            raise UserError(f"{flag} must be >= {low}, got {getattr(args, name)}")
    if getattr(args, "timeout", 60.0) <= 0:
        raise UserError(f"--timeout must be > 0 seconds, got {args.timeout}")
    return OpenAIChatGenerator(
        base_url=args.base_url,
        model=args.model,
        temperature=getattr(args, "temperature", 0.7),
        top_p=getattr(args, "top_p", 1.0),
        max_tokens=getattr(args, "max_tokens", 256),
        timeout=getattr(args, "timeout", 60.0),
        max_retries=getattr(args, "max_retries", 4),
        send_seed=getattr(args, "send_seed", True),
        extra_body=_parse_extra_body(getattr(args, "extra_body", None)),
    )


def _parse_extra_body(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if value is None or isinstance(value, Mapping):
        return dict(value or {})
    try:
        body = json.loads(value)
    except ValueError as err:
        raise UserError(
            f"--extra-body is not JSON ({err.msg} at column {err.colno}); give an object like '{{\"top_k\": 20}}'"
        ) from None
    if not isinstance(body, dict):
        raise UserError("--extra-body must be a JSON object, like '{\"top_k\": 20}'")
    return body
