"""The `openai` generator: thoughts from any OpenAI-compatible chat-completions server.

One `POST {base_url}/chat/completions` per `ThinkRequest`, through the official `openai`
package's `AsyncOpenAI` client, so the OpenAI API, vLLM, llama.cpp, SGLang and the like
all work. The API key comes from `OPENAI_API_KEY` (a placeholder when unset: local servers
need none) and never appears in a reason, a log line or `settings`.

Before the first request (`prepare`), `GET {base_url}/models` says what can be known
early: a key the server refuses (exit 2), a server that cannot be reached (exit 74), a
`--model` it does not list, and the served model's context (`max_model_len`, as vLLM and
`metatrain serve` report it) against `--max-tokens`. A server without that listing is
simply asked.

Retries are ours, not the client's (it is built with `max_retries=0`): `--timeout` must
bound each attempt as a whole (the client's bounds each read, so a server trickling a byte
at a time holds it for ever), and a hung attempt must be reported as it is retried (one
line, stderr, through `logging`). What is retried is what the client would retry (read in
openai 1.57, `_base_client.py`): timeouts, dropped connections, HTTP 408, 409, 429 and >=
500 (unless `x-should-retry: false`), waiting what `retry-after-ms` / `Retry-After` say
when that is in (0, 60] s, else `retry_delay * 2**n` (at most 8 s) less up to 25 % jitter;
and a 200 whose body is not a chat completion. `max_retries + 1` attempts in all.

What does not live here: the interface (`generators.py`), the CLI (`metatrain annotate`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from metatrain.annotate.generators import (
    GenerationError,
    ThinkReply,
    ThinkRequest,
    register_generator,
)
from metatrain.errors import FaultError, UserError

logger = logging.getLogger(__name__)

#: What the client sends as the key when OPENAI_API_KEY is unset (vLLM, llama.cpp need none).
PLACEHOLDER_API_KEY = "unused"
#: The first backoff between attempts, and the longest (the client's own constants).
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
#: The longest wait a server's `Retry-After` is honoured for.
MAX_RETRY_AFTER = 60.0
#: Statuses worth another attempt (as the openai client decides).
RETRY_STATUSES = frozenset({408, 409, 429})
#: Keys of a model card that give the served model's context, in tokens.
CONTEXT_KEYS = ("max_model_len", "context_length", "context_window")
#: Characters of a server's message kept in a reason.
MAX_MESSAGE_CHARS = 400
#: Characters per token assumed to estimate a prompt's length (English text, common tokenizers).
CHARS_PER_TOKEN = 4


class MalformedReply(Exception):
    """A 200 response that is not a chat completion; the message is safe to print."""


class _Failed(Exception):
    """One attempt failed: `what` says how, `retry` whether another attempt may pass."""

    def __init__(self, what: str, *, retry: bool, status: int | None = None, message: str | None = None,
                 wait: float | None = None):
        super().__init__(what)
        self.what, self.retry, self.status, self.message, self.wait = what, retry, status, message, wait


class OpenAIChatGenerator:
    """A `ThoughtGenerator` that asks an OpenAI-compatible server.

    Args:
        base_url: the API root, e.g. `http://localhost:8000/v1` (the request goes to
            `{base_url}/chat/completions`); checked by `check_base_url`.
        model: the model name the server knows.
        temperature, top_p, max_tokens: sampling settings, sent with every request.
        timeout: seconds one attempt may take, all of it (connect, send, every read).
        max_retries: retries after the first attempt, for any failure that can pass.
        send_seed: send `seed` (the request's seed, reduced to 31 bits, which every server
            that takes a seed accepts). The OpenAI API, vLLM and llama.cpp take it; turn it
            off for a server that refuses unknown fields.
        extra_body: more fields for the request body (e.g. `{"top_k": 20}` for vLLM).
        retry_delay: the first backoff between attempts, in seconds.
        api_key: the key; default `OPENAI_API_KEY`, else a placeholder.

    Raises:
        UserError: a malformed `base_url`.
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
        from openai import (
            AsyncOpenAI,  # here, not at the top: `import openai` takes ~0.4 s
        )

        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.model = model
        self.base_url = check_base_url(base_url).rstrip("/")
        self.temperature = temperature
        self.top_p = top_p
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.max_retries = max_retries
        self.send_seed = send_seed
        self.extra_body = dict(extra_body or {})
        self.retry_delay = retry_delay
        self._where = f"POST {redact_url(self.base_url)}/chat/completions"
        self._api_key = api_key or os.environ.get("OPENAI_API_KEY") or PLACEHOLDER_API_KEY
        self._client: AsyncOpenAI = AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, timeout=timeout,
                                                max_retries=0)

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

    async def prepare(self, example: ThinkRequest | None) -> None:
        """Ask `GET {base_url}/models` what can be refused before any document is requested.

        Raises:
            UserError: the server refuses the key, does not list `--model`, or says a
                context that `--max-tokens` cannot fit.
            FaultError: the server cannot be reached, or fails, after the retries.
        """
        where = f"GET {redact_url(self.base_url)}/models"
        try:
            raw = await self._attempts(where, lambda: self._client.models.with_raw_response.list())
        except GenerationError as e:
            if e.status in (404, 405, 501):
                return  # the server lists no models: its replies will say what is wrong
            if e.settings:
                raise UserError(f"{e.reason}; check --base-url and the key in OPENAI_API_KEY") from None
            raise FaultError(f"{e.reason}; is the server running at --base-url {redact_url(self.base_url)}?") from None
        try:
            cards = json.loads(raw.http_response.content).get("data")
        except (ValueError, AttributeError):
            return  # not the OpenAI shape: nothing to learn from it
        if not isinstance(cards, list) or not cards:
            return
        card = next((c for c in cards if isinstance(c, dict) and c.get("id") == self.model), None)
        if card is None:
            served = ", ".join(str(c.get("id")) for c in cards[:8] if isinstance(c, dict))
            raise UserError(f"--model {self.model} is not served by {redact_url(self.base_url)} (it serves: "
                            f"{served}); give --model one of those")
        context = next((card[k] for k in CONTEXT_KEYS if isinstance(card.get(k), int) and card[k] > 0), None)
        if context is not None:
            self._check_fits(context, example)

    def _check_fits(self, context: int, example: ThinkRequest | None) -> None:
        """Refuse a `max_tokens` that no prompt leaves room for; warn when the first prompt
        probably does not (its length is estimated: the server's tokenizer is not ours)."""
        chars = sum(len(m.get("content", "")) for m in example.messages) if example else 0
        prompt = max(1, chars // CHARS_PER_TOKEN)
        fits = max(1, context - prompt)
        if self.max_tokens >= context:
            raise UserError(f"--max-tokens {self.max_tokens} cannot fit the served model's context of {context} "
                            f"tokens with a prompt of about {prompt} tokens: use --max-tokens <= {fits}")
        if self.max_tokens + prompt > context:
            logger.warning("--max-tokens %d and the first prompt (about %d tokens) may not fit the served model's "
                           "context of %d tokens; a request that does not is listed as failed with the server's "
                           "message (use --max-tokens <= %d or a shorter prompt: --context-chars)",
                           self.max_tokens, prompt, context, fits)

    async def think(self, request: ThinkRequest) -> ThinkReply:
        """One chat completion for `request`; its content, stripped, is the thought.

        Raises:
            GenerationError: after `max_retries + 1` attempts, or at once for an error
                that retrying cannot fix (e.g. HTTP 400, 401, 404), with the server's message.
        """
        body = self._request_body(request)

        async def create() -> Any:
            raw = await self._client.chat.completions.with_raw_response.create(**body)
            try:
                return parse_completion(raw.http_response.content)
            except MalformedReply as err:
                raise _Failed(str(err), retry=True) from None

        return await self._attempts(self._where, create)

    async def _attempts(self, where: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """`call()`, each attempt bounded by `timeout` as a whole, retried as the module
        docstring says; each retry is logged in one line.

        Raises:
            GenerationError: the last attempt's failure, after how many attempts.
        """
        total = self.max_retries + 1
        for attempt in range(1, total + 1):
            try:
                async with asyncio.timeout(self.timeout):
                    return await call()
            except _Failed as failed:
                failure = failed
            except Exception as err:  # noqa: BLE001 - classified; anything else is re-raised there
                failure = self._classify(err)
            if not failure.retry or attempt == total:
                reason = f"{where}: {failure.what} after {_plural(attempt)}"
                if failure.message:
                    reason += f": {failure.message}"
                settings = failure.status is not None and not failure.retry
                raise GenerationError(reason, status=failure.status, message=failure.message,
                                      settings=settings) from None
            delay = failure.wait
            if delay is None:
                delay = min(self.retry_delay * 2.0 ** (attempt - 1), MAX_RETRY_DELAY) * (1 - 0.25 * random.random())
            logger.warning("%s: %s (attempt %d of %d); retrying in %.1f s", where, failure.what, attempt, total, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _classify(self, err: Exception) -> _Failed:
        """How one attempt failed: its status, the server's message (secrets removed), whether
        to retry and after how long."""
        import openai

        if isinstance(err, (TimeoutError, openai.APITimeoutError)):
            return _Failed(f"timed out (after {self.timeout:g} s)", retry=True)
        if isinstance(err, openai.APIStatusError):
            status = err.status_code
            should = err.response.headers.get("x-should-retry", "").lower()
            retry = should == "true" or (should != "false" and (status in RETRY_STATUSES or status >= 500))
            return _Failed(f"HTTP {status}", retry=retry, status=status, message=self._message(err),
                           wait=_retry_after(err.response.headers))
        if isinstance(err, openai.APIConnectionError):
            cause = type(err.__cause__).__name__ if err.__cause__ else "connection error"
            return _Failed(f"connection failed ({cause})", retry=True)
        raise err

    def _message(self, err: Any) -> str | None:
        """The server's message of an error response, cut short, without the key (an error
        body may echo the request, its Authorization header included)."""
        body = getattr(err, "body", None)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            body = body["error"]
        if isinstance(body, dict):
            text = body.get("message")
        elif isinstance(body, str):
            text = body
        else:
            text = None
        if not isinstance(text, str) or not text.strip():
            try:
                text = err.response.text
            except Exception:  # noqa: BLE001 - a body that cannot be read says nothing
                return None
        text = " ".join(text.split())
        if self._api_key and self._api_key != PLACEHOLDER_API_KEY:
            text = text.replace(self._api_key, "***")
        text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
        if len(text) > MAX_MESSAGE_CHARS:
            text = text[:MAX_MESSAGE_CHARS] + "..."
        return text or None

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


def check_base_url(url: str) -> str:
    """`url` when it is an http(s) URL with a host (and a valid port).

    Raises:
        UserError: anything else, in one line with an example.
    """
    example = "give the API root, e.g. --base-url http://localhost:8000/v1"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UserError(f"--base-url {url!r} is not a URL ({e}); {example}") from None
    if parts.scheme not in ("http", "https"):
        raise UserError(f"--base-url {url!r} is not an http:// or https:// URL; {example}")
    if not parts.hostname:
        raise UserError(f"--base-url {url!r} names no host; {example}")
    del port  # parsed only to check it
    return url


def _retry_after(headers: Any) -> float | None:
    """Seconds the server asks to wait (`retry-after-ms`, `Retry-After`), when in (0, 60]."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            seconds = float(headers.get(name)) * scale
        except (TypeError, ValueError):
            continue
        if 0 < seconds <= MAX_RETRY_AFTER:
            return seconds
    return None


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
    group.add_argument("--timeout", type=float, default=60.0,
                       help="seconds one attempt of a request may take, all of it (default 60)")
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
    check_base_url(args.base_url)
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
