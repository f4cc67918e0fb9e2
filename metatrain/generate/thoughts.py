"""`ThoughtWriter`: the thought a trained model writes at the end of a document prefix.

The generational loop (`metatrain annotate --generator metatrain`) and the self-thinking
evaluation (`metatrain eval --self-think`) ask the same question of a checkpoint: given
a document so far (its text, and the thinking already in it), what thinking block does
the model write next? The model continues the prefix under the thinking lock
(`metatrain.engine.constraints.THINKING_LOCK`): `<thinking>` and the mantra are forced
as in training (the run's own mantra and policy), the model writes the block's text,
and the block ends at `</thinking>`. No chat template: the model was trained on
documents, not on instructions.

The prefix is cut to fit: at most `context_chars` characters of its end, then fewer
until the prompt leaves `max_new_tokens` under the model's `max_seq_len` (a cut segment
loses its front; a context starts with text, never with a cut-off thought). Each
segment is given the mode it is in before the cut, so a cut that drops a mode change
leaves the rest in its own mode. A block may open in another mode than the text before
it (after quoted human text, back in AI mode): the mode tags into it are forced first. A block cut off by `max_new_tokens` keeps the text
written so far.

Two ways to decode, on the inference engine (`metatrain.engine.Engine`), on the mesh
the parameters are on:

    write(prefixes)        a batch job: every prefix decoded together (`Engine.run`,
                           on the caller's thread; deterministic, so every process of
                           a multi-process job steps the same batches)
    await think(prefix)    one prefix, submitted to the engine's own thread, which
                           batches whatever is in flight (`Engine.submit`)

Either way each prefix samples from its own stream (its `seed`), so a thought does not
depend on which others shared its batch, and the two ways write the same thought.
Temperature 0 is greedy.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from metatrain.documents import DEFAULT_DOCUMENT_MODE, Document, Segment
from metatrain.engine.constraints import THINKING_LOCK, GrammarChooser, TagConstraints
from metatrain.engine.engine import Engine, Handle, RowRequest
from metatrain.engine.sampling import SamplingConfig
from metatrain.errors import UserError
from metatrain.generate.generator import Generator, recover_segments
from metatrain.generate.prompts import EncodedPrompt, encode_prompt, grammar_states
from metatrain.tokenizer.encoder import Encoder
from metatrain.tokenizer.mantra import block_gets_mantra

#: Characters of document text the model sees before the point (then cut to fit).
DEFAULT_CONTEXT_CHARS = 4000
#: Tokens a prompt keeps at least, whatever `max_new_tokens` asks for.
MIN_PROMPT_ROOM = 8


@dataclasses.dataclass(frozen=True)
class ThoughtPrefix:
    """A document up to an insertion point.

    Attributes:
        doc_id: the document's id (for messages).
        context: the document so far, as segments (text, and the thinking in it).
        mode: the document's mode (the base of `context`).
        seed: this point's sampling seed (0 to 2**32 - 1; unused when greedy).
        block_mode: the mode the block opens in (None: the mode `context` ends in); the
            mode tags from there are forced before `<thinking>`, as a document's block in
            another mode has them.
    """

    doc_id: str
    context: tuple[Segment, ...]
    mode: str = DEFAULT_DOCUMENT_MODE
    seed: int = 0
    block_mode: str | None = None


@dataclasses.dataclass(frozen=True)
class Thought:
    """What the model wrote at a point.

    Attributes:
        text: the block's text, the mantra removed, stripped ("" when the model closed
            the block at once).
        tokens_in: prompt tokens (the forced `<thinking>` and mantra included).
        tokens_out: generated tokens (the closing `</thinking>` included).
        finish_reason: `end_of_mode` (the block closed), `length` (`max_new_tokens`
            ran out) or `eos`.
    """

    text: str
    tokens_in: int
    tokens_out: int
    finish_reason: str


class ThoughtWriter:
    """Writes thoughts with a loaded model (see the module docstring).

    Args:
        generator: the loaded checkpoint (parameters, shape, encoder, mesh).
        sampling: temperature (0: greedy), top-k, top-p.
        max_new_tokens: budget of a thought (cut to what `max_seq_len` leaves after
            `MIN_PROMPT_ROOM` tokens of prompt).
        context_chars: characters of the prefix the model sees, at most.
        max_batch: rows decoded at once.
        flag: the option `max_new_tokens` came from, for messages.

    Raises:
        UserError: `max_new_tokens` or `max_batch` below 1, or `max_batch` rows that do
            not fit the device's free memory.
    """

    def __init__(self, generator: Generator, *, sampling: SamplingConfig = SamplingConfig(0.0),
                 max_new_tokens: int = 96, context_chars: int = DEFAULT_CONTEXT_CHARS, max_batch: int = 8,
                 flag: str = "--max-tokens"):
        if max_new_tokens < 1:
            raise UserError(f"{flag} must be >= 1, got {max_new_tokens}")
        if max_batch < 1:
            raise UserError(f"--max-batch must be >= 1, got {max_batch}")
        self.generator = generator
        self.sampling = sampling
        config = generator.model_config
        self.max_new_tokens = min(max_new_tokens, config.max_seq_len - MIN_PROMPT_ROOM)
        self.context_chars = context_chars
        self.max_batch = max_batch
        encoder = generator.encoder
        self.mantra = encoder.mantra or ""
        self._constraints = TagConstraints.from_encoder(encoder, lock_mode=THINKING_LOCK)
        self._batch_engine = self._engine()
        self._server: Engine | None = None
        too_many = self._batch_engine.memory().shortfall(self._batch_engine.max_batch)
        if too_many:
            raise UserError(f"--max-batch {max_batch}: {too_many}; give a smaller --max-batch")

    def _engine(self) -> Engine:
        """A fresh engine (allocation is lazy: nothing is on the device until it decodes)."""
        g = self.generator
        return Engine(g.params, g.model_config, self._constraints, max_batch=self.max_batch,
                      eos_id=g.encoder.eos_id, chooser=GrammarChooser(self.sampling), mesh=g.mesh)

    # -- prompts -----------------------------------------------------------------------------------
    def encode(self, prefix: ThoughtPrefix) -> EncodedPrompt:
        """The point's prompt under the thinking lock, its context cut from the front to fit.

        Raises:
            UserError: the prefix ends in a mode where thinking may not open, the mantra
                alone leaves no room in `max_seq_len`, or the context breaks the grammar.
        """
        encoder = self.generator.encoder
        limit = self.generator.model_config.max_seq_len
        room = limit - self.max_new_tokens
        context = with_modes(prefix.context, prefix.mode)
        end = context[-1].mode if context else prefix.mode
        target = prefix.block_mode or end
        allowed = encoder.grammar.registry.thinking_modes
        if target not in allowed:
            raise UserError(f"document {prefix.doc_id!r}: the block would open in mode {target}, where no thinking "
                            f"may open (it may open in: {', '.join(allowed)})")
        # The mantra policy counts the blocks of the whole document, as training does, not
        # only those left in a cut context (`first`: a later block gets none).
        blocks_before = sum(1 for seg in prefix.context if seg.kind == "thinking")
        keep = self.context_chars
        while True:
            prompt = Document(prefix.doc_id, last_chars(context, keep), mode=prefix.mode)
            encoded = _into_block(encoder, encode_prompt(encoder, prompt), target, blocks_before)
            length = len(encoded.ids)  # the forced <thinking> and mantra included
            if length <= room:
                return encoded
            if keep <= 1:
                raise UserError(f"document {prefix.doc_id!r}: the mantra alone leaves no room for a thought "
                                f"of {self.max_new_tokens} tokens in max_seq_len {limit}; ask for fewer tokens")
            keep = max(1, keep * room // (2 * length))

    def _request(self, prefix: ThoughtPrefix, encoded: EncodedPrompt) -> RowRequest:
        return RowRequest(encoded, self.max_new_tokens, seed=prefix.seed)

    def _thought(self, encoded: EncodedPrompt, handle: Handle) -> Thought:
        encoder = self.generator.encoder
        ids = [*encoded.prefix, *handle.tokens]
        segments = recover_segments(encoder, ids, encoded.prompt_state)
        text = next((s.text for s in segments if s.kind == "thinking"), "")
        if self.mantra and text.startswith(self.mantra):
            text = text[len(self.mantra):]
        # `ids` starts with the forced prefix, already counted in `tokens_in`.
        return Thought(text.strip(), tokens_in=len(encoded.ids), tokens_out=len(handle.tokens),
                       finish_reason=handle.finish_reason or "length")

    # -- decoding ----------------------------------------------------------------------------------
    def write(self, prefixes: Sequence[ThoughtPrefix]) -> list[Thought]:
        """The thought at the end of every prefix, decoded together (at most `max_batch`
        rows at once), in order. Blocks the caller's thread until all have ended."""
        if not prefixes:
            return []
        encoded = [self.encode(p) for p in prefixes]
        handles = self._batch_engine.run([self._request(p, e) for p, e in zip(prefixes, encoded, strict=True)])
        return [self._thought(e, h) for e, h in zip(encoded, handles, strict=True)]

    async def think(self, prefix: ThoughtPrefix) -> Thought:
        """The thought at the end of one prefix, decoded on the engine's own thread beside
        the others in flight.

        Raises:
            UserError: the prompt does not fit, or the engine is shutting down.
        """
        encoded = self.encode(prefix)
        if self._server is None:
            self._server = self._engine()
        self._server.start()
        handle = self._server.submit(self._request(prefix, encoded))
        try:
            while await handle.next() is not None:
                pass
        except asyncio.CancelledError:
            handle.cancel()
            raise
        return self._thought(encoded, handle)

    def close(self) -> None:
        """Stop the engine thread `think` started (idempotent)."""
        if self._server is not None:
            self._server.stop()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    @property
    def settings(self) -> dict[str, Any]:
        """The sampling settings, as provenance records them."""
        s = self.sampling
        return {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "max_new_tokens": self.max_new_tokens}


def _into_block(encoder: Encoder, plain: EncodedPrompt, mode: str, blocks_before: int) -> EncodedPrompt:
    """`plain` (a prompt without a lock) with the mode tags into `mode`, `<thinking>` and,
    where the policy gives the document's block number `blocks_before` one, the mantra
    forced after it (what the thinking lock of `encode_prompt` forces, with the block
    counted in the whole document rather than in the prompt)."""
    grammar = encoder.grammar
    tags = [encoder.tag_ids[t] for t in grammar.mode_path(grammar.states[plain.state].mode, mode)]
    opening = encoder.tag_ids[grammar.registry.thinking_open]
    gets_mantra = encoder.mantra and block_gets_mantra(encoder.mantra_policy, blocks_before)
    mantra = encoder.mantra_ids.tolist() if gets_mantra else []
    forced = np.asarray([*tags, opening, *mantra], np.int32)
    state = int(grammar_states(encoder, forced, start=plain.state)[-1])
    return EncodedPrompt(np.concatenate([plain.ids, forced]).astype(np.int32), tuple(forced.tolist()),
                         plain.prompt_state, state, plain.blocks + 1)


def with_modes(segments: Sequence[Segment], mode: str) -> tuple[Segment, ...]:
    """`segments` with each one's mode written out (the mode it is in), so that any
    tail of them encodes in the same modes as the whole (`mode`: the document's)."""
    out = []
    for seg in segments:
        mode = seg.mode or mode
        out.append(seg if seg.mode == mode else dataclasses.replace(seg, mode=mode))
    return tuple(out)


def last_chars(segments: Sequence[Segment], keep: int) -> tuple[Segment, ...]:
    """The end of `segments` holding at most `keep` characters of text (a cut segment
    loses its front; at least one text segment remains). Give them with their modes
    written out (`with_modes`): a cut drops the segments that changed mode."""
    out: list[Segment] = []
    left = keep
    for seg in reversed(segments):
        if left <= 0:
            break
        if len(seg.text) > left:
            seg = dataclasses.replace(seg, text=seg.text[-left:])
        out.append(seg)
        left -= len(seg.text)
    out.reverse()
    while out and out[0].kind != "text":
        out.pop(0)  # a context starts with text, never with a cut-off thought
    # Nothing left: a space, in the mode the segments end in.
    return tuple(out) or (Segment("text", " ", mode=segments[-1].mode if segments else None),)
