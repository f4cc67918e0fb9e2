"""Prompts to token ids, and the grammar state each one leaves the decoder in.

A prompt is plain text (a human-mode text segment) or a structured `Document`; either
way it is encoded by the `Encoder`, so a literal `<AI>` or `<thinking>` in its text is
ordinary characters and leaves the grammar state where it was. A document prompt is
left open: its end-of-document EOS and the mode tags that would close it are dropped,
so generation continues in the mode its last segment is in. The AI-mode lock appends
the mode tags leading into the locked mode (`<AI>`), which count as generated.

A control token (`--control good`) conditions the reply on it (Korbak et al. 2023,
arXiv:2302.08582): it is placed where the encoder places a segment's control, after the
mode tags into the reply's mode and before its body (or before `<thinking>`), and
counts as generated too, so the reply's first segment carries it. Generation itself never
emits a control token (`TagConstraints` masks them all).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from metatrain.documents import Document
from metatrain.engine.constraints import THINKING_LOCK, check_lock_mode
from metatrain.errors import UserError
from metatrain.tokenizer.encoder import EncodeError, Encoder
from metatrain.tokenizer.mantra import block_gets_mantra

Prompt = str | Document


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """One prompt, ready for the decoder.

    Attributes:
        ids: int32 [n], `BOS` + the prompt + the lock's mode tags (`prefix`).
        prefix: the lock's mode tags at the end of `ids`, reported as generated.
        prompt_state: grammar state after the prompt, before `prefix`: where the
            reported ids start.
        state: grammar state after `ids`: where generation starts.
        blocks: thinking blocks opened in `ids` (for the `first` mantra policy).
    """

    ids: np.ndarray
    prefix: tuple[int, ...]
    prompt_state: int
    state: int
    blocks: int


def _document_ids(encoder: Encoder, doc: Document) -> np.ndarray:
    """`encode(doc)` without its final EOS and the mode tags that close the document."""
    grammar = encoder.grammar
    try:
        ids = encoder.encode(doc).ids[:-1]
    except EncodeError as e:
        raise UserError(f"prompt {doc.id!r}: {e.reason}") from None
    mode = doc.mode
    for seg in doc.segments:
        mode = seg.mode or mode
    closing = grammar.mode_path(mode, doc.mode) + grammar.mode_path(doc.mode, grammar.base_mode)
    return ids[: len(ids) - len(closing)]


def grammar_states(encoder: Encoder, ids: np.ndarray, start: int | None = None) -> np.ndarray:
    """The grammar state after each of `ids` (int32 [n]), from `start` (default: initial).

    Raises:
        ValueError: the ids hold a tag that is illegal where it stands.
    """
    bound = encoder.bound_grammar
    state = np.int32(encoder.grammar.initial_state() if start is None else start)
    out = np.empty((len(ids),), np.int32)
    for i, token in enumerate(np.asarray(ids)):
        state = bound.next_states(state, token)
        if state < 0:
            raise ValueError(f"token {int(token)} at {i} is a tag the grammar forbids there")
        out[i] = state
    return out


def check_prompt_text(prompt: str) -> str:
    """`prompt` if it is text that UTF-8 can carry; UserError naming the bad byte otherwise.

    A command-line argument that is not UTF-8 reaches Python with each bad byte as a lone
    surrogate (U+DC80..U+DCFF, PEP 383); no tokenizer can encode those.
    """
    if not isinstance(prompt, str):
        raise UserError(f"a prompt must be text, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        char = ord(prompt[e.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"lone surrogate U+{char:04X}"
        raise UserError(
            f"prompt {prompt[:40]!r} is not valid UTF-8 ({what} at character {e.start}); "
            "give the prompt as UTF-8 text"
        ) from None
    return prompt


def _thinking_prefix(encoder: Encoder, body: np.ndarray, state: int) -> tuple[int, ...]:
    """`<thinking>`, then the mantra when the policy gives this block one, as in training."""
    if encoder.grammar.states[state].thinking:
        raise UserError("the prompt ends inside a thinking block; the thinking lock opens a new one")
    opening = encoder.tag_ids[encoder.grammar.registry.thinking_open]
    blocks = int(np.sum(body == opening))
    mantra = encoder.mantra_ids.tolist() if encoder.mantra and block_gets_mantra(encoder.mantra_policy, blocks) else []
    return (opening, *mantra)


def control_id(encoder: Encoder, name: str) -> int:
    """The token of control `name` (`good` -> the id of `<|good|>`).

    Raises:
        UserError: the tag registry has no such control (the message lists those it has).
    """
    registry = encoder.grammar.registry
    tags = dict(registry.controls)
    if name not in tags:
        have = ", ".join(tags) if tags else "none"
        raise UserError(f"control {name!r} is not in the tag registry {registry.source} (its controls: {have})")
    return encoder.tag_ids[tags[name]]


def encode_prompt(encoder: Encoder, prompt: Prompt, lock_mode: str | None = None,
                  control: str | None = None) -> EncodedPrompt:
    """Encodes a prompt and, with a lock, the mode tags into the locked mode; with a
    `control`, its token after them (before `<thinking>` under the thinking lock).

    Raises:
        UserError: the document breaks the grammar, the lock mode or the control is
            unknown, or the prompt ends inside a thinking block and a control is asked for.
    """
    if isinstance(prompt, Document):
        body = _document_ids(encoder, prompt)
    else:
        check_prompt_text(prompt)
        body = np.asarray([encoder.bos_id, *encoder.tokenizer.encode_texts([prompt])[0]], np.int32)
    prompt_state = int(grammar_states(encoder, body)[-1])
    state = prompt_state
    conditioning: tuple[int, ...] = ()
    if control is not None:
        conditioning = (control_id(encoder, control),)
        if encoder.grammar.states[state].thinking:
            raise UserError(f"the prompt ends inside a thinking block, where no control token may stand; "
                            f"end the block, or leave out the control {control!r}")
    prefix: tuple[int, ...] = ()
    if lock_mode == THINKING_LOCK:
        prefix = conditioning + _thinking_prefix(encoder, body, state)
    elif lock_mode is not None:
        check_lock_mode(encoder, lock_mode)
        mode = encoder.grammar.states[state].mode
        prefix = tuple(encoder.tag_ids[t] for t in encoder.grammar.mode_path(mode, lock_mode)) + conditioning
    else:
        prefix = conditioning
    if prefix:
        state = int(grammar_states(encoder, np.asarray(prefix), start=state)[-1])
    ids = np.concatenate([body, np.asarray(prefix, np.int32)]).astype(np.int32)
    thinking_open = encoder.tag_ids[encoder.grammar.registry.thinking_open]
    return EncodedPrompt(ids, prefix, prompt_state, state, int(np.sum(ids == thinking_open)))
