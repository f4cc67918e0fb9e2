"""What writes the thinking: one small interface, and the registry of generators.

A generator turns one `ThinkRequest` (an insertion point of one document: the rendered
chat prompt, and the document so far as segments) into one `ThinkReply` (the thinking
text, stripped; "" means "no thinking here", which is not an error). Generators are
async so that many requests can be in flight (`--concurrency`); one that cannot overlap
requests (a local checkpoint) simply serialises them.

Adding a generator: a class with the attributes and methods of `ThoughtGenerator`,
an entry in `GENERATORS` naming the function that builds it from the CLI's options
(`@register_generator`), and its module in `GENERATOR_MODULES`.

Before the first request the runner calls `prepare(example)` once: what can be known
about the generator before any document is requested (a served model's context against
`--max-tokens`, a key the server refuses) is refused there, as a `UserError` (the
settings) or a `FaultError` (the endpoint), before anything is written.

Errors: a request that fails for good (after the generator's own retries) raises
`GenerationError` with a reason that never contains a secret (API keys are never part
of any message); the runner then lists the document as failed, with the reason.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, Protocol

from metatrain.documents import Segment


@dataclasses.dataclass(frozen=True)
class ThinkRequest:
    """One insertion point to write a thought for.

    Attributes:
        doc_id: the document's id.
        point: index of the insertion point in the document (0-based).
        messages: the chat messages ({"role", "content"}), rendered from the template.
        context: the document up to the insertion point, as segments (the text so far and
            the thinking kept or accepted so far); a model trained by metatrain continues it.
        attempt: 0 for the first request, then 1, 2, ... after rejected blocks.
        seed: a seed derived from the run's seed, the document and the point (and attempt),
            for generators that sample.
        mode: the document's mode (the base of `context`).
    """

    doc_id: str
    point: int
    messages: tuple[dict[str, str], ...]
    context: tuple[Segment, ...]
    attempt: int = 0
    seed: int = 0
    mode: str = "human"


@dataclasses.dataclass(frozen=True)
class ThinkReply:
    """A generator's answer: the thinking text (stripped; "" for none) and token counts."""

    text: str
    tokens_in: int = 0
    tokens_out: int = 0


class GenerationError(Exception):
    """A request failed for good (after retries); `reason` is safe to print and store.

    Attributes:
        reason: what failed, where, after how many attempts, with the server's message.
        status: the HTTP status of the last attempt (None: no response, or not HTTP).
        message: the server's own message (secrets removed), or None.
        settings: True when retrying cannot help and the user's settings or credentials
            must change (an HTTP 4xx other than 408, 409 and 429); False when the
            endpoint failed (5xx, timeouts, dropped connections, malformed replies).
    """

    def __init__(self, reason: str, *, status: int | None = None, message: str | None = None,
                 settings: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.message = message
        self.settings = settings


class ThoughtGenerator(Protocol):
    """The interface every generator implements.

    Attributes:
        kind: the `--generator` name (`openai`, `metatrain`).
        model: what wrote the thoughts, for provenance (a model name, a checkpoint path).
        settings: sampling settings and the like, JSON-serialisable, for provenance.
    """

    kind: str
    model: str
    settings: dict[str, Any]

    async def prepare(self, example: ThinkRequest | None) -> None:
        """Checks before the first request (`example` is the run's first one, None when
        there is nothing to do). Raises UserError or FaultError."""
        ...

    async def think(self, request: ThinkRequest) -> ThinkReply:
        """The thought for `request`. Raises `GenerationError` when it fails for good."""
        ...

    async def aclose(self) -> None:
        """Release connections and devices."""
        ...


#: `--generator` name -> builder from the parsed CLI options (`argparse.Namespace`).
GENERATORS: dict[str, Callable[[Any], ThoughtGenerator]] = {}

#: `--generator` name -> the module that registers its builder (imported by `build_generator`).
GENERATOR_MODULES: dict[str, str] = {
    "openai": "metatrain.annotate.openai_chat",
    "metatrain": "metatrain.annotate.local_model",
}


def build_generator(kind: str, options: Any) -> ThoughtGenerator:
    """The generator `kind` (a key of `GENERATOR_MODULES`) built from the CLI's options."""
    importlib.import_module(GENERATOR_MODULES[kind])
    return GENERATORS[kind](options)


def register_generator(kind: str) -> Callable[[Callable[[Any], ThoughtGenerator]], Callable[[Any], ThoughtGenerator]]:
    """Decorator: `@register_generator("openai")` on a builder `fn(args) -> ThoughtGenerator`."""

    def add(builder: Callable[[Any], ThoughtGenerator]) -> Callable[[Any], ThoughtGenerator]:
        GENERATORS[kind] = builder
        return builder

    return add
