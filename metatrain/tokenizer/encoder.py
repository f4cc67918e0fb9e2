"""Documents to `(ids, roles)` and back: tags from structure, text from SentencePiece.

Layout of an encoded document (docs/design.md sections 2-3), every tag one token:

    BOS  [mode tags to the document's mode]
         per segment: [mode tag if it changes mode] [control tag] body
             text body:     the text                                  (role TEXT)
             thinking body: <thinking> [mantra] thinking text </thinking>
                                       (MANTRA)  (THINKING)
         [mode tags back to the document's mode, then to the base mode]
    EOS

BOS, EOS and every tag have role TAG. Text is encoded run by run between tags, so a
literal `<AI>` in a segment's text is ordinary characters and never the tag id.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metatrain.documents import Document, Segment
from metatrain.io.formats import RecordError
from metatrain.io.paths import DEFAULT_TAGS
from metatrain.roles import ROLE_DTYPE, Role
from metatrain.tokenizer.grammar import BoundGrammar, Grammar, IllegalTransition
from metatrain.tokenizer.mantra import DEFAULT_MANTRA, block_gets_mantra, check_mantra_policy
from metatrain.tokenizer.registry import TagRegistry, load_registry
from metatrain.tokenizer.spm import SpmTokenizer


class EncodeError(ValueError):
    """A document the grammar rejects; `record_error()` turns it into a `RecordError`.

    Attributes:
        reason: what is wrong, naming the segment and the modes or tags involved.
        document: the rejected document.
    """

    def __init__(self, reason: str, document: Document):
        super().__init__(reason)
        self.reason = reason
        self.document = document

    def record_error(self) -> RecordError:
        """The same problem as a `RecordError` at the document's file and line."""
        doc = self.document
        return RecordError(doc.path or "<document>", doc.line, self.reason, doc.id)


@dataclasses.dataclass(frozen=True)
class EncodedDocument:
    """One encoded document.

    Attributes:
        doc_id: the document's id.
        ids: int32 [n], token ids, `[BOS] body [EOS]`.
        roles: int8 [n], `metatrain.roles.Role` of each token.
    """

    doc_id: str
    ids: np.ndarray
    roles: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def canonical_segments(doc: Document) -> tuple[Segment, ...]:
    """The segments `decode_segments(encode(doc).ids)` gives back.

    Each segment gets its mode spelt out, and a text segment that follows a text
    segment in the same mode with no control token between them merges into it
    (nothing in the token stream separates the two).
    """
    out: list[Segment] = []
    mode = doc.mode
    for seg in doc.segments:
        mode = seg.mode or mode
        seg = dataclasses.replace(seg, mode=mode)
        prev = out[-1] if out else None
        if (prev is not None and prev.kind == seg.kind == "text" and prev.mode == mode
                and seg.control is None):
            out[-1] = dataclasses.replace(prev, text=prev.text + seg.text)
        else:
            out.append(seg)
    return tuple(out)


class Encoder:
    """Encodes documents to token ids and roles, and decodes ids back.

    Args:
        tokenizer: an `SpmTokenizer`, or the path of a `.model` file.
        grammar_or_registry: the tag grammar (or the registry to build it from).
        mantra: text that opens thinking blocks.
        mantra_policy: `every` block, the `first` block of a document, or `none`.

    Raises:
        UserError: the tokenizer lacks a tag of the registry (see `SpmTokenizer`).
        ValueError: unknown mantra policy.
    """

    def __init__(
        self,
        tokenizer: SpmTokenizer | str | Path,
        grammar_or_registry: Grammar | TagRegistry,
        *,
        mantra: str = DEFAULT_MANTRA,
        mantra_policy: str = "every",
    ):
        grammar = grammar_or_registry
        self.grammar: Grammar = grammar if isinstance(grammar, Grammar) else Grammar(grammar)
        registry = self.grammar.registry
        if not isinstance(tokenizer, SpmTokenizer):
            tokenizer = SpmTokenizer.load(tokenizer, registry)
        elif tokenizer.registry is not registry:
            tokenizer = SpmTokenizer(tokenizer.proto.SerializeToString(), registry, source=tokenizer.source)
        self.tokenizer = tokenizer
        self.mantra = mantra
        self.mantra_policy = check_mantra_policy(mantra_policy)
        self.vocab_size: int = tokenizer.vocab_size
        self.bos_id: int = tokenizer.bos_id
        self.eos_id: int = tokenizer.eos_id
        self.pad_id: int = tokenizer.pad_id
        self.tag_ids: dict[str, int] = dict(tokenizer.tag_ids)
        self.mantra_ids: np.ndarray = np.asarray(tokenizer.encode_texts([mantra])[0], dtype=np.int32)
        self.mantra_ids.setflags(write=False)
        self._mantra_list: list[int] = self.mantra_ids.tolist()
        self._id_to_tag = {i: t for t, i in self.tag_ids.items()}
        self._control_names = {t: n for n, t in registry.controls}
        self._special_ids = np.array(sorted(set(self.tag_ids.values()) | {self.bos_id, self.eos_id}
                                            | ({self.pad_id} if self.pad_id >= 0 else set())), dtype=np.int32)

    @classmethod
    def from_files(
        cls,
        tokenizer_path: str | Path,
        tags_path: str | Path = DEFAULT_TAGS,
        *,
        mantra: str = DEFAULT_MANTRA,
        mantra_policy: str = "every",
    ) -> "Encoder":
        """An encoder for a `.model` file and a tag registry file."""
        registry = load_registry(tags_path)
        return cls(SpmTokenizer.load(tokenizer_path, registry), registry, mantra=mantra, mantra_policy=mantra_policy)

    @functools.cached_property
    def bound_grammar(self) -> BoundGrammar:
        """The grammar tied to this tokenizer's ids (EOS legal only where a document may end)."""
        return self.grammar.bind(self.tag_ids, self.vocab_size, eos_id=self.eos_id)

    # -------------------------------------------------------------------- encode

    def _plan(self, doc: Document) -> list[tuple[str, str | Role]]:
        """The document as a list of ("tag", tag) and ("text", role) items, grammar-checked."""
        g = self.grammar
        items: list[tuple[str, str | Role]] = []
        state = g.initial_state()

        def emit(tag: str) -> None:
            nonlocal state
            state = g.next_state(state, tag)
            items.append(("tag", tag))

        try:
            opening = g.mode_path(g.base_mode, doc.mode)
        except IllegalTransition as e:
            raise EncodeError(f"document mode: {e}", doc) from None
        # Modes passed through on the way in belong outside the document: a segment
        # may not leave the document's mode for them ("ai" documents are all AI text).
        outside = {g.base_mode}
        for tag in opening:
            outside.add(g.states[state].mode)
            emit(tag)
        outside.discard(doc.mode)
        mode = doc.mode
        blocks = 0
        for i, seg in enumerate(doc.segments):
            try:
                target = seg.mode or mode
                if target in outside:
                    raise IllegalTransition(
                        f"mode {target} leaves the document's mode {doc.mode} (a document with mode "
                        f"{doc.mode} is entirely {doc.mode} text; use mode {target} for the document instead)")
                if target != mode:
                    emit(g.mode_tag(mode, target))
                    mode = target
                if seg.control is not None:
                    emit(g.registry.control_tag(seg.control))
                if seg.kind == "thinking":
                    if mode not in g.registry.thinking_modes:
                        raise IllegalTransition(
                            f"thinking cannot open in mode {mode} (it may open in: "
                            f"{', '.join(g.registry.thinking_modes)})")
                    emit(g.registry.thinking_open)
                    if block_gets_mantra(self.mantra_policy, blocks) and self.mantra:
                        items.append(("mantra", Role.MANTRA))
                    items.append(("text", Role.THINKING))
                    emit(g.registry.thinking_close)
                    blocks += 1
                else:
                    if not seg.text:
                        raise IllegalTransition("a text segment needs non-empty text (drop the segment)")
                    items.append(("text", Role.TEXT))
            except (IllegalTransition, KeyError) as e:
                reason = e.args[0] if isinstance(e, KeyError) else str(e)
                raise EncodeError(f"segment {i} ({seg.kind}): {reason}", doc) from None
        try:
            closing = g.mode_path(mode, doc.mode) + g.mode_path(doc.mode, g.base_mode)
        except IllegalTransition as e:
            raise EncodeError(f"end of document: {e}", doc) from None
        for tag in closing:
            emit(tag)
        return items

    def encode(self, doc: Document) -> EncodedDocument:
        """Encodes one document to `[BOS] body [EOS]` ids and their roles.

        Raises:
            EncodeError: the document breaks the grammar (unknown mode or control, an
                illegal mode change, thinking where it may not open).
        """
        items = self._plan(doc)
        texts = iter(self.tokenizer.encode_texts([s.text for s in doc.segments]))
        tag, mantra = int(Role.TAG), int(Role.MANTRA)
        ids: list[int] = [self.bos_id]
        roles: list[int] = [tag]
        for kind, value in items:
            if kind == "tag":
                ids.append(self.tag_ids[value])
                roles.append(tag)
            elif kind == "mantra":
                ids.extend(self._mantra_list)
                roles.extend([mantra] * len(self._mantra_list))
            else:
                run = next(texts)
                ids.extend(run)
                roles.extend([int(value)] * len(run))
        ids.append(self.eos_id)
        roles.append(tag)
        return EncodedDocument(doc.id, np.asarray(ids, dtype=np.int32), np.asarray(roles, dtype=ROLE_DTYPE))

    # -------------------------------------------------------------------- decode

    def _split(self, ids: Sequence[int] | np.ndarray) -> list[tuple[str, object]]:
        """Ids as ("tag", tag), ("special", id) and ("run", ids) items."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        special = np.isin(ids, self._special_ids)
        items: list[tuple[str, object]] = []
        start = 0
        for pos in np.flatnonzero(special).tolist() + [len(ids)]:
            if pos > start:
                items.append(("run", ids[start:pos]))
            if pos < len(ids):
                token = int(ids[pos])
                items.append(("tag", self._id_to_tag[token]) if token in self._id_to_tag else ("special", token))
            start = pos + 1
        return items

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text with every tag written out (e.g. `<thinking>`); BOS, EOS and PAD are left out.

        For reading only: a literal `<AI>` in text looks the same as the tag here; use
        `decode_segments` for structure.
        """
        out = []
        for kind, value in self._split(ids):
            if kind == "run":
                out.append(self.tokenizer.decode_text(value))
            elif kind == "tag":
                out.append(value)
        return "".join(out)

    def decode_segments(self, ids: Sequence[int] | np.ndarray) -> list[Segment]:
        """Recovers the segments (kind, text, mode, control) from token ids.

        Each segment's mode is spelt out, and the mantra is removed from the thinking
        blocks this encoder's policy gives it, so `decode_segments(encode(doc).ids)`
        equals `canonical_segments(doc)`. A thinking block left open at the end (a
        generation cut short) still comes back.

        Raises:
            IllegalTransition: the ids hold a tag the grammar forbids where it stands.
        """
        g = self.grammar
        state = g.initial_state()
        segments: list[Segment] = []
        control: str | None = None
        thinking: list[np.ndarray] | None = None
        blocks = 0

        def close_block() -> None:
            nonlocal thinking, control, blocks
            block = np.concatenate(thinking) if thinking else np.zeros((0,), np.int64)
            m = self.mantra_ids
            if block_gets_mantra(self.mantra_policy, blocks) and np.array_equal(block[: len(m)], m):
                block = block[len(m):]
            segments.append(Segment("thinking", self.tokenizer.decode_text(block), g.states[state].mode, control))
            thinking, control = None, None
            blocks += 1

        for kind, value in self._split(ids):
            if kind == "special":
                continue
            if kind == "run":
                if thinking is not None:
                    thinking.append(value)
                else:
                    segments.append(Segment("text", self.tokenizer.decode_text(value), g.states[state].mode, control))
                    control = None
                continue
            if value == g.registry.thinking_close and g.states[state].thinking:
                close_block()
            new_state = g.next_state(state, value)
            if value == g.registry.thinking_open:
                thinking = []
            elif value in self._control_names:
                control = self._control_names[value]
            state = new_state
        if thinking is not None:
            close_block()
        return segments
