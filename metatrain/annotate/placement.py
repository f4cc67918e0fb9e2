"""Where thinking goes in a document, and putting it there without changing the text.

Three layouts (`PlacementConfig.where`):

- `passage` (the founding note's `[TEXT] ... [THINKING] ...`): the text is cut into
  units by `split`, and a thought may follow each unit.
- `document` (TPT, Wang et al. 2025, arXiv 2509.20186): one thought after the whole
  document; `split` is not used.
- `chunk` (BoLT, Ruan et al. 2025, arXiv 2503.18866): the text is cut into chunks by
  `split`, and each chunk gets one thought, before or after it (`order`). With
  `order: random` (the default for chunks) each chunk's side is drawn from a generator
  seeded by sha256 of (seed, document id), so a rerun or a resumed run places every
  thought where the first run did. A chunk's thought after it and the next chunk's
  thought before it may then be neighbours (each chunk still has one thought).

Splitting never changes the text: the units are consecutive substrings of each text
segment. `paragraph` cuts after a line break followed by blank lines (`\\n\\n`, `\\r\\n\\r\\n`,
lines of spaces count as blank); `sentence` also cuts after `.`, `!`, `?` or `…`
(repeats allowed) and any closing quotes or brackets when whitespace follows, the
whitespace staying with the sentence, and right after `。`, `！` or `？` (a simple rule:
"Dr. Smith" is cut too); `tokens:N` cuts after every N SentencePiece pieces, at piece
boundaries that are character boundaries (the pieces of the tokenizer given to
`plan_insertions`, by default the sample tokenizer). A unit of whitespace only joins
the unit before it (or, at the start of a segment, the one after), so no thought sits
after a bare line break.

No point is placed where a thought would touch a thinking block the document already
has (those are kept where they are, unless `replace_thinking` drops them; only whitespace
between them still counts as touching), or where the mode cannot open thinking (when
`plan_insertions` is told which modes can). `max_blocks` keeps k of the n possible points,
evenly spread and always including the last one: point `floor((i + 1) * n / k) - 1`
for i in 0..k-1 (k = 1 keeps the point at the end).

Before planning, a document's segments are tidied in ways the encoder does not see: a
text segment that follows a text segment in the same mode, with no control, joins it
(so units do not depend on how the text happened to be segmented), and a dropped
thinking block's mode change moves to the segment after it. A text segment cut in
pieces keeps its `mode` and `control` on the first piece; later pieces have neither,
and continue in the same mode (a thinking block returns to the mode it opened in).

The runner asks for thoughts point by point: `context_at` gives the document up to a
point with the thoughts accepted so far, which is what a metatrain model continues;
`assemble` puts every thought in. What decides the thoughts lives elsewhere
(`metatrain.annotate.generators`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
import re
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from metatrain.annotate.inputs import RawDocument
from metatrain.documents import Segment
from metatrain.io.paths import SAMPLE_TOKENIZER

WHERES: tuple[str, ...] = ("passage", "document", "chunk")
ORDERS: tuple[str, ...] = ("before", "after", "random")
SPLITS: tuple[str, ...] = ("paragraph", "sentence", "tokens:N")

_CLOSERS = "\"'”’»)\\]}」』）"
_PARAGRAPH_BREAK = r"\r?\n(?:[^\S\r\n]*\r?\n)+"
_PARAGRAPH = re.compile(_PARAGRAPH_BREAK)
_SENTENCE = re.compile(rf"[.!?…]+[{_CLOSERS}]*\s+|[。！？]+[{_CLOSERS}]*\s*|{_PARAGRAPH_BREAK}")


@dataclasses.dataclass(frozen=True)
class PlacementConfig:
    """Where the thoughts of a document go.

    Attributes:
        where: "passage", "document" or "chunk" (see the module docstring).
        split: how text is cut into units: "paragraph", "sentence" or "tokens:N" (N >= 1).
        max_blocks: the most thoughts per document (None: one per point).
        order: "before", "after" or "random": which side of its chunk a thought goes.
            Only `chunk` may choose; None means "random" for chunks and "after" otherwise.
        seed: seeds the random order (with the document id).
        replace_thinking: drop the document's own thinking blocks first.
    """

    where: str = "passage"
    split: str = "paragraph"
    max_blocks: int | None = None
    order: str | None = None
    seed: int = 0
    replace_thinking: bool = False

    def __post_init__(self) -> None:
        if self.where not in WHERES:
            raise ValueError(f"where: {self.where!r} is not one of {', '.join(WHERES)}")
        if self.split not in ("paragraph", "sentence"):
            tokens = isinstance(self.split, str) and self.split.startswith("tokens:")
            count = self.split[len("tokens:"):] if tokens else ""
            if not (count.isascii() and count.isdigit() and int(count) >= 1):
                raise ValueError(f"split: {self.split!r} is not one of paragraph, sentence, tokens:N "
                                 "(N a whole number of tokens, at least 1, e.g. tokens:512)")
        if self.max_blocks is not None and (not _is_int(self.max_blocks) or self.max_blocks < 1):
            raise ValueError(f"max_blocks: {self.max_blocks!r} must be a whole number >= 1, or null for no cap")
        if self.order is not None:
            if self.order not in ORDERS:
                raise ValueError(f"order: {self.order!r} is not one of {', '.join(ORDERS)}")
            if self.where != "chunk" and self.order != "after":
                raise ValueError(f"order: {self.order} applies to where=chunk; where={self.where} always puts "
                                 "the thought after its text (use where=chunk, or leave order out)")
        if not _is_int(self.seed):
            raise ValueError(f"seed: {self.seed!r} must be a whole number")
        if not isinstance(self.replace_thinking, bool):
            raise ValueError(f"replace_thinking: {self.replace_thinking!r} must be true or false")

    @property
    def effective_order(self) -> str:
        """`order`, or its default: "random" for chunks, "after" otherwise."""
        if self.order is not None:
            return self.order
        return "random" if self.where == "chunk" else "after"

    @property
    def split_tokens(self) -> int | None:
        """N of `tokens:N`, else None."""
        return int(self.split[len("tokens:"):]) if self.split.startswith("tokens:") else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class InsertionPoint:
    """One place a thought may go.

    Attributes:
        index: the point's number in its document, 0-based, in document order.
        position: "after" its passage or "before" it.
        passage: the text the thought is about: the unit before the point ("after"),
            the unit after it ("before"), or the whole text (`where: document`).
        segment: index, in `segments`, of the text segment the point lies in.
        offset: the point lies after the first `offset` characters of that segment.
        segments: the document's segments as placement sees them (tidied; thinking
            dropped when `replace_thinking`); shared by all points of a document.
    """

    index: int
    position: str
    passage: str
    segment: int
    offset: int
    segments: tuple[Segment, ...] = dataclasses.field(repr=False, compare=False)

    @property
    def before(self) -> tuple[Segment, ...]:
        """The document up to this point, with its own thinking and no new thoughts."""
        return _build(self.segments, [self], [], stop=self.index)


def text_of(segments: Iterable[Segment]) -> str:
    """The text of `segments`: their text segments joined (thinking left out)."""
    return "".join(s.text for s in segments if s.kind == "text")


# ---------------------------------------------------------------------------- splitting


def split_text(text: str, split: str, tokenizer: Any = None) -> list[str]:
    """`text` cut into units by `split` ("paragraph", "sentence", "tokens:N"); they join to `text`."""
    return [text[a:b] for a, b in _unit_bounds(text, split, tokenizer)]


def _unit_bounds(text: str, split: str, tokenizer: Any) -> list[tuple[int, int]]:
    """`(start, end)` of each unit of `text`, whitespace-only units joined to a neighbour."""
    if not text:
        return []
    if split == "paragraph":
        cuts = [m.end() for m in _PARAGRAPH.finditer(text)]
    elif split == "sentence":
        cuts = [m.end() for m in _SENTENCE.finditer(text)]
    else:
        cuts = _token_cuts(text, int(split[len("tokens:"):]), _processor(tokenizer))
    bounds: list[tuple[int, int]] = []
    start = 0
    for end in [c for c in cuts if 0 < c < len(text)] + [len(text)]:
        if end <= start:
            continue
        if text[start:end].strip():
            bounds.append((start, end))
            start = end
        elif bounds:  # whitespace only: joins the unit before it
            bounds[-1] = (bounds[-1][0], end)
            start = end
        # else: leading whitespace, kept for the next unit (start stays)
    if start < len(text):  # the whole text is whitespace
        bounds.append((start, len(text)))
    return bounds


@functools.lru_cache(maxsize=1)
def _default_processor():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(SAMPLE_TOKENIZER))


def _processor(tokenizer: Any):
    """The SentencePiece processor of `tokenizer` (an `SpmTokenizer`, a processor, or None)."""
    if tokenizer is None:
        return _default_processor()
    return getattr(tokenizer, "processor", tokenizer)


def _token_cuts(text: str, n: int, processor: Any) -> list[int]:
    """Character offsets after every `n` pieces of `text` (moved on to a character boundary)."""
    data = text.encode("utf-8")
    byte_cuts: list[int] = []
    count = 0
    for piece in processor.encode(text, out_type="proto").pieces:
        count += 1
        end = piece.end
        # A character spelt in byte pieces: only its last piece has a width; cut after it.
        if count >= n and end > piece.begin and 0 < end < len(data) and (data[end] & 0xC0) != 0x80:
            byte_cuts.append(end)
            count = 0
    cuts, chars, last = [], 0, 0
    for b in byte_cuts:
        if b > last:
            chars += len(data[last:b].decode("utf-8"))
            cuts.append(chars)
            last = b
    return cuts


# ---------------------------------------------------------------------------- planning


def placement_segments(doc: RawDocument, config: PlacementConfig) -> tuple[Segment, ...]:
    """The segments placement works on: thinking dropped if `replace_thinking`, text runs joined.

    A text segment joins the text segment before it when it has no control and its
    mode is None or the mode already in force; a dropped thinking block's mode moves to
    the next segment that has none.
    """
    out: list[Segment] = []
    mode, pending = doc.mode, None
    for seg in doc.segments:
        if config.replace_thinking and seg.kind == "thinking":
            pending = seg.mode if seg.mode is not None else pending
            continue
        if pending is not None and seg.mode is None:
            seg = dataclasses.replace(seg, mode=pending)
        pending = None
        prev_mode = mode
        mode = seg.mode or mode
        prev = out[-1] if out else None
        if (prev is not None and prev.kind == seg.kind == "text" and seg.control is None
                and (seg.mode is None or seg.mode == prev_mode)):
            out[-1] = dataclasses.replace(prev, text=prev.text + seg.text)
        else:
            out.append(seg)
    return tuple(out)


def plan_insertions(
    doc: RawDocument,
    config: PlacementConfig,
    tokenizer: Any = None,
    *,
    thinking_modes: Collection[str] | None = None,
) -> list[InsertionPoint]:
    """The points of `doc` where thoughts go, in document order.

    Args:
        doc: the document.
        config: the placement.
        tokenizer: for `split: tokens:N`, an `SpmTokenizer` or a SentencePiece
            processor (default: the sample tokenizer).
        thinking_modes: modes a thinking block may open in (the tag registry's
            `thinking_modes`); points in other modes are left out. None: no check.
    """
    segments = placement_segments(doc, config)
    modes = _modes_before(segments, doc.mode)
    candidates: list[tuple[int, int, str, str]] = []  # (segment, offset, position, passage)
    if config.where == "document":
        if segments and segments[-1].kind == "text":
            j = len(segments) - 1
            candidates.append((j, len(segments[j].text), "after", text_of(segments)))
    else:
        order = config.effective_order
        rng = _order_rng(config.seed, doc.id) if order == "random" else None
        for j, seg in enumerate(segments):
            if seg.kind != "text":
                continue
            for start, end in _unit_bounds(seg.text, config.split, tokenizer):
                side = order if rng is None else ("before" if rng.random() < 0.5 else "after")
                if seg.text[start:end].strip():
                    candidates.append((j, end if side == "after" else start, side, seg.text[start:end]))
    candidates = [c for c in candidates if _can_insert(segments, modes, c[0], c[1], thinking_modes)]
    if config.max_blocks is not None and len(candidates) > config.max_blocks:
        n, k = len(candidates), config.max_blocks
        candidates = [candidates[(i + 1) * n // k - 1] for i in range(k)]
    return [InsertionPoint(i, side, passage, j, offset, segments)
            for i, (j, offset, side, passage) in enumerate(candidates)]


def _order_rng(seed: int, doc_id: str) -> random.Random:
    """A generator that depends only on (seed, document id): never on Python's `hash`."""
    digest = hashlib.sha256(f"{seed}\x00{doc_id}".encode("utf-8", "surrogatepass")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _thinking_beside(segments: Sequence[Segment], j: int, step: int) -> bool:
    """Whether a thinking block is the next segment from j in direction `step`, looking past
    segments that are only whitespace."""
    k = j + step
    while 0 <= k < len(segments) and segments[k].kind == "text" and not segments[k].text.strip():
        k += step
    return 0 <= k < len(segments) and segments[k].kind == "thinking"


def _modes_before(segments: Sequence[Segment], doc_mode: str) -> list[str]:
    """`modes[j]`: the mode in force before segment j; `modes[len]`: at the end."""
    modes = [doc_mode]
    for seg in segments:
        modes.append(seg.mode or modes[-1])
    return modes


def _can_insert(segments: Sequence[Segment], modes: Sequence[str], j: int, offset: int,
                thinking_modes: Collection[str] | None) -> bool:
    """Whether a thought may go after `offset` characters of text segment j."""
    at_start, at_end = offset == 0, offset == len(segments[j].text)
    if (at_start and _thinking_beside(segments, j, -1)) or (at_end and _thinking_beside(segments, j, 1)):
        return False
    mode = modes[j] if at_start else modes[j + 1]
    return thinking_modes is None or mode in thinking_modes


# ---------------------------------------------------------------------------- assembling


def assemble(
    doc: RawDocument,
    points: Sequence[InsertionPoint],
    thoughts: Sequence[str | None],
    config: PlacementConfig,
) -> tuple[Segment, ...]:
    """The document's segments with `thoughts[i]` as a thinking block at `points[i]`.

    A thought that is None, empty or only whitespace puts no block there. The text
    segments join to the document's text exactly (`text_of`).

    Raises:
        ValueError: `thoughts` and `points` differ in length, or the points were not
            planned for this document and config.
    """
    if len(thoughts) != len(points):
        raise ValueError(f"{len(thoughts)} thoughts for {len(points)} insertion points; give one per point "
                         "(None for no thought)")
    segments = _checked_segments(doc, points, config)
    return _build(segments, points, thoughts)


def context_at(
    doc: RawDocument,
    points: Sequence[InsertionPoint],
    k: int,
    thoughts_so_far: Sequence[str | None],
    config: PlacementConfig,
) -> tuple[Segment, ...]:
    """The document up to point k, with the thoughts of points 0..k-1 put in.

    This is the context the thought at point k continues. `thoughts_so_far` holds at
    least the first k thoughts (later ones are ignored).

    Raises:
        ValueError: k is not a point's index, fewer than k thoughts, or the points were
            not planned for this document and config.
    """
    if not 0 <= k < len(points):
        raise ValueError(f"no insertion point {k}; the document has {len(points)}")
    if len(thoughts_so_far) < k:
        raise ValueError(f"context_at({k}) needs the {k} thoughts before it, got {len(thoughts_so_far)}")
    segments = _checked_segments(doc, points, config)
    return _build(segments, points, list(thoughts_so_far[:k]), stop=k)


def _checked_segments(doc: RawDocument, points: Sequence[InsertionPoint],
                      config: PlacementConfig) -> tuple[Segment, ...]:
    segments = placement_segments(doc, config)
    last = (0, 0)
    for i, p in enumerate(points):
        ok = (p.index == i and 0 <= p.segment < len(segments) and segments[p.segment].kind == "text"
              and 0 <= p.offset <= len(segments[p.segment].text) and (p.segment, p.offset) >= last)
        if not ok:
            raise ValueError(f"insertion point {i} ({p.segment}, {p.offset}) was not planned for document "
                             f"{doc.id!r} with this placement; plan the points again")
        last = (p.segment, p.offset)
    return segments


def _build(segments: Sequence[Segment], points: Sequence[InsertionPoint],
           thoughts: Sequence[str | None], stop: int | None = None) -> tuple[Segment, ...]:
    """`segments` with `thoughts[p.index]` at each point; cut just before point `stop` if given."""
    at: dict[int, list[InsertionPoint]] = {}
    for p in sorted(points, key=lambda p: p.index):
        at.setdefault(p.segment, []).append(p)
    out: list[Segment] = []
    for j, seg in enumerate(segments):
        if seg.kind != "text":
            out.append(seg)
            continue
        pos, first = 0, True
        for p in at.get(j, ()):
            thought = thoughts[p.index] if p.index < len(thoughts) else None
            has_block = thought is not None and bool(thought.strip())
            if (has_block or p.index == stop) and p.offset > pos:
                out.append(_piece(seg, pos, p.offset, first))
                pos, first = p.offset, False
            if p.index == stop:
                return tuple(out)
            if has_block:
                out.append(Segment("thinking", thought))
        if first or pos < len(seg.text):
            out.append(_piece(seg, pos, len(seg.text), first))
    return tuple(out)


def _piece(seg: Segment, start: int, end: int, first: bool) -> Segment:
    """Characters start..end of a text segment; only the first piece keeps mode and control."""
    if first and start == 0 and end == len(seg.text):
        return seg
    if first:
        return dataclasses.replace(seg, text=seg.text[start:end])
    return Segment("text", seg.text[start:end])
