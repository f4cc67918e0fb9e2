"""Thinking ablations: the same documents with their thinking changed and their text not.

Does the thinking make the text after it more predictable, or does it only add tokens?
Score the text of the same documents four ways:

    kept         the documents as they are
    removed      every thinking block dropped (with a control tag that labels it)
    shuffled     every block replaced by a block of another document (a derangement
                 of the documents that have thinking; block j takes that document's
                 block j mod its count), so the thinking is fluent but unrelated
    mantra_only  every block reduced to its mantra: `<thinking> mantra </thinking>`
                 (an empty block where the mantra policy gives it none)

`removed - kept` is the headline: the bits per byte of text that thinking saves.
`shuffled - kept` separates *this* thinking from any thinking; `mantra_only - kept`
what the fixed opening alone does.

Variants are built on the encoded tokens, not on the documents: a block is exactly the
span from a `<thinking>` tag to its `</thinking>`, so the text tokens (ids, roles and
order) cannot change; `check_same_text` asserts it for every document. Mode tags
around a block stay where they are (a block in another mode leaves `<AI></AI>`
behind when removed), so what differs is the thinking alone. The same works for token
caches, which keep no documents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from metatrain.roles import Role
from metatrain.tokenizer.encoder import EncodedDocument, Encoder

#: The variants, `kept` first; each other one is reported as a difference to `kept`.
VARIANTS: tuple[str, ...] = ("kept", "removed", "shuffled", "mantra_only")


@dataclasses.dataclass(frozen=True)
class Block:
    """One thinking block of a document: tokens `start .. end-1` (both tags included),
    and `label`, the start of the control tag before it (== start when it has none)."""

    start: int
    end: int
    label: int


def thinking_blocks(encoder: Encoder, doc: EncodedDocument) -> list[Block]:
    """The thinking blocks of an encoded document, in order.

    A block left open (a document cut short) runs to the end of the document minus its EOS.
    """
    registry = encoder.grammar.registry
    opening, closing = encoder.tag_ids[registry.thinking_open], encoder.tag_ids[registry.thinking_close]
    controls = {encoder.tag_ids[tag] for _, tag in registry.controls}
    ids = np.asarray(doc.ids)
    blocks, start = [], None
    for i, token in enumerate(ids.tolist()):
        if token == opening and start is None:
            start = i
        elif token == closing and start is not None:
            label = start - 1 if start > 0 and int(ids[start - 1]) in controls else start
            blocks.append(Block(start, i + 1, label))
            start = None
    if start is not None:
        end = len(ids) - 1 if int(ids[-1]) == encoder.eos_id else len(ids)
        label = start - 1 if start > 0 and int(ids[start - 1]) in controls else start
        blocks.append(Block(start, end, label))
    return blocks


def _replace(doc: EncodedDocument, blocks: Sequence[Block], parts: Sequence[tuple[np.ndarray, np.ndarray]],
             *, drop_labels: bool) -> EncodedDocument:
    """`doc` with each block replaced by its `(ids, roles)` part."""
    ids_out, roles_out, at = [], [], 0
    for block, (ids, roles) in zip(blocks, parts):
        cut = block.label if drop_labels else block.start
        ids_out += [doc.ids[at:cut], ids]
        roles_out += [doc.roles[at:cut], roles]
        at = block.end
    ids_out.append(doc.ids[at:])
    roles_out.append(doc.roles[at:])
    return EncodedDocument(doc.doc_id, np.concatenate(ids_out).astype(np.int32),
                           np.concatenate(roles_out).astype(doc.roles.dtype))


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0,), np.int32), np.zeros((0,), np.int8)


def remove_thinking(encoder: Encoder, doc: EncodedDocument) -> EncodedDocument:
    """`doc` without its thinking blocks (and the control tags that label them)."""
    blocks = thinking_blocks(encoder, doc)
    return _replace(doc, blocks, [_empty()] * len(blocks), drop_labels=True)


def mantra_only(encoder: Encoder, doc: EncodedDocument) -> EncodedDocument:
    """`doc` with each block reduced to its tags and the mantra tokens it has."""
    blocks = thinking_blocks(encoder, doc)
    parts = []
    for b in blocks:
        ids, roles = doc.ids[b.start:b.end], doc.roles[b.start:b.end]
        keep = (roles == Role.MANTRA) | (roles == Role.TAG)
        parts.append((ids[keep], roles[keep]))
    return _replace(doc, blocks, parts, drop_labels=False)


def shuffle_thinking(encoder: Encoder, docs: Sequence[EncodedDocument], seed: int = 0) -> list[EncodedDocument] | None:
    """Each document's blocks replaced by blocks of another document; None when fewer
    than two documents have thinking (there is nothing to shuffle between)."""
    blocks = [thinking_blocks(encoder, d) for d in docs]
    donors = [i for i, b in enumerate(blocks) if b]
    if len(donors) < 2:
        return None
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(donors))
    # A random cyclic shift of a random order: a derangement (no document keeps its own).
    giver = {donors[order[k]]: donors[order[(k + 1) % len(donors)]] for k in range(len(donors))}
    out = []
    for i, doc in enumerate(docs):
        if not blocks[i]:
            out.append(doc)
            continue
        source, theirs = docs[giver[i]], blocks[giver[i]]
        parts = []
        for j in range(len(blocks[i])):
            b = theirs[j % len(theirs)]
            parts.append((source.ids[b.start:b.end], source.roles[b.start:b.end]))
        out.append(_replace(doc, blocks[i], parts, drop_labels=False))
    return out


def make_variants(encoder: Encoder, docs: Sequence[EncodedDocument], seed: int = 0) -> dict[str, list[EncodedDocument]]:
    """Every variant of `docs` (`VARIANTS` order; `shuffled` left out when impossible),
    each checked to keep the text tokens of every document."""
    variants: dict[str, list[EncodedDocument] | None] = {
        "kept": list(docs),
        "removed": [remove_thinking(encoder, d) for d in docs],
        "shuffled": shuffle_thinking(encoder, docs, seed),
        "mantra_only": [mantra_only(encoder, d) for d in docs],
    }
    out = {name: v for name, v in variants.items() if v is not None}
    for name, v in out.items():
        check_same_text(docs, v, name)
    return out


def text_tokens(doc: EncodedDocument) -> np.ndarray:
    """The ids of the document's text tokens, in order."""
    return np.asarray(doc.ids)[np.asarray(doc.roles) == Role.TEXT]


def check_same_text(kept: Sequence[EncodedDocument], variant: Sequence[EncodedDocument], name: str) -> None:
    """Raises AssertionError unless every document keeps exactly its text tokens."""
    if len(kept) != len(variant):
        raise AssertionError(f"ablation {name}: {len(variant)} documents, expected {len(kept)}")
    for a, b in zip(kept, variant):
        if not np.array_equal(text_tokens(a), text_tokens(b)):
            raise AssertionError(f"ablation {name} changed the text tokens of document {a.doc_id!r}")
