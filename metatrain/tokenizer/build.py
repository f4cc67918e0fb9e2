"""Making tokenizers: train a SentencePiece model with the tags, or add tags to one.

Training settings are chosen so that text round-trips exactly (see `EXACT_SETTINGS`):
SentencePiece's defaults rewrite text (NFKC), drop newlines, squeeze spaces and add a
dummy `▁` prefix that shifts segmentation next to a tag. Every tag is a control piece
(never matched in raw text) and byte fallback is on (no character becomes `<unk>`).

Outputs may be in a bucket (`gs://`, `metatrain.io.storage`): SentencePiece's trainer
writes local files only, so it trains into a scratch directory (beside a local output,
in the system's temporary directory for a bucket) and each result is then written with
`write_atomically`, as one whole object in a bucket.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from metatrain.documents import SkipCounter, read_documents
from metatrain.errors import UserError, critical_section
from metatrain.io.compression import MAX_LINE_BYTES
from metatrain.io.outputs import check_output_file, write_atomically
from metatrain.io.storage import StoragePath, as_path, is_remote
from metatrain.tokenizer.mantra import DEFAULT_MANTRA
from metatrain.tokenizer.registry import TagRegistry, load_registry
from metatrain.tokenizer.spm import (
    SpmTokenizer,
    first_changed_id,
    parse_model_proto,
    read_model_proto,
)

#: SentencePiece trainer settings under which every text round-trips exactly.
EXACT_SETTINGS: dict[str, object] = {
    "normalization_rule_name": "identity",  # no NFKC: characters are never rewritten
    "add_dummy_prefix": False,  # no `▁` glued to the start of every text run
    "remove_extra_whitespaces": False,  # runs of spaces, leading/trailing spaces kept
    "allow_whitespace_only_pieces": True,  # "\n\n" and "    " may become single pieces
    "byte_fallback": True,  # unseen characters become bytes, never <unk>
    "split_digits": True,
    "max_sentencepiece_length": 16,
}
#: Longest text handed to the trainer as one sentence; longer segments are cut at newlines.
_MAX_CHUNK_CHARS = 4096
#: How many texts the post-training self-check round-trips.
_SELF_CHECK_TEXTS = 2000


@dataclasses.dataclass(frozen=True)
class TrainReport:
    """What `train_tokenizer` did.

    Attributes:
        model_path: the written `.model` file (a `.vocab` file sits beside it), a local
            `Path` or, for a bucket, an `epath.Path`.
        vocab_size: pieces in the model, tags and byte pieces included.
        documents: documents read.
        texts: text pieces handed to the trainer.
        skipped: bad records skipped (see `SkipCounter`).
    """

    model_path: StoragePath
    vocab_size: int
    documents: int
    texts: int
    skipped: int


def _chunks(text: str, limit: int = _MAX_CHUNK_CHARS) -> Iterator[str]:
    """Cuts `text` into pieces of at most `limit` characters, after a newline where possible."""
    while len(text) > limit:
        cut = text.rfind("\n", 0, limit) + 1 or limit
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def training_texts(documents, *, mantra: str = DEFAULT_MANTRA) -> Iterator[str]:
    """Every segment's text (in chunks), plus the mantra once per document with thinking."""
    for doc in documents:
        if mantra and any(s.kind == "thinking" for s in doc.segments):
            yield mantra
        for segment in doc.segments:
            yield from _chunks(segment.text)


def train_tokenizer(
    inputs: Sequence[str | Path],
    *,
    vocab_size: int,
    out_prefix: str | Path,
    registry: TagRegistry | None = None,
    model_type: str = "bpe",
    mantra: str = DEFAULT_MANTRA,
    max_texts: int = 5_000_000,
    character_coverage: float = 0.9995,
    strict: bool = False,
    skips: SkipCounter | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> TrainReport:
    """Trains a SentencePiece model on the documents' text, with every tag a control piece.

    Writes `PREFIX.model` and `PREFIX.vocab`, then checks that the new model loads with
    the registry and that training texts round-trip exactly. A `gs://` prefix writes the
    two as objects in the bucket, trained in a local scratch directory first.

    Args:
        inputs: JSON Lines document files.
        vocab_size: total pieces, including BOS/EOS/UNK, the 256 byte pieces and the tags.
        out_prefix: output path without the `.model` suffix, local or `gs://BUCKET/PATH`.
        registry: the tags to reserve (default: the shipped `tokenizer/tags.yaml`).
        model_type: `bpe` or `unigram`.
        mantra: mantra text, included once per document that has thinking blocks.
        max_texts: texts sampled for training when the corpus has more.
        character_coverage: share of characters covered by pieces; the rest are bytes.
        strict: stop at the first bad record instead of skipping it.
        skips: counter for skipped records.
        max_line_bytes: the longest JSON Lines line read; a longer one is a bad record.

    Raises:
        UserError: no documents, or SentencePiece refused the settings (e.g. a vocabulary
            too large for the corpus); the message says which.
    """
    registry = registry if registry is not None else load_registry()
    skips = SkipCounter() if skips is None else skips
    minimum = 3 + 256 + len(registry.tags)
    if vocab_size <= minimum:
        raise UserError(f"--vocab-size {vocab_size} is too small: BOS/EOS/UNK, 256 byte pieces and "
                        f"{len(registry.tags)} tags already take {minimum}; use at least {minimum + 1}")
    if model_type not in ("bpe", "unigram"):
        raise UserError(f"unknown model type {model_type!r}; use bpe or unigram")
    out_prefix = as_path(out_prefix)
    model_path = out_prefix.with_name(out_prefix.name + ".model")
    vocab_path = out_prefix.with_name(out_prefix.name + ".vocab")
    for path in (model_path, vocab_path):
        check_output_file(path, inputs=[*inputs, registry.source], option="--out")
    documents = list(read_documents(inputs, strict=strict, skips=skips, max_line_bytes=max_line_bytes))
    if not documents:
        raise UserError(f"no valid documents in {', '.join(map(str, inputs))} ({skips.summary()})")
    texts = list(training_texts(documents, mantra=mantra))
    # SentencePiece writes PREFIX.model and PREFIX.vocab itself: let it write them in a
    # private directory beside the outputs (any local one for a bucket), check the model
    # there, and only then publish each file atomically. A refusal, a failed check or an
    # interrupt (Ctrl-C, or SIGTERM, which the CLI turns into an exception) leaves the old
    # outputs as they were and removes the scratch directory.
    if not is_remote(str(out_prefix)):
        out_prefix.parent.mkdir(parents=True, exist_ok=True)
    staging: Path | None = None
    try:
        # An interrupt waits until `staging` names the directory just made, and is raised
        # inside this `try`, whose `finally` removes it.
        with critical_section():
            staging = Path(tempfile.mkdtemp(prefix=f"metatrain-{out_prefix.name}.", suffix=".partial")
                           if is_remote(str(out_prefix)) else
                           tempfile.mkdtemp(prefix=f".{out_prefix.name}.", suffix=".partial", dir=out_prefix.parent))
        staged = staging / out_prefix.name
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts),
                model_prefix=str(staged),
                model_type=model_type,
                vocab_size=vocab_size,
                control_symbols=list(registry.tags),
                character_coverage=character_coverage,
                input_sentence_size=max_texts,
                shuffle_input_sentence=True,
                max_sentence_length=4 * _MAX_CHUNK_CHARS + 16,  # bytes; chunks are <= _MAX_CHUNK_CHARS chars
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
                **EXACT_SETTINGS,
            )
        except RuntimeError as e:
            raise UserError(f"SentencePiece refused to train: {e}") from None
        # The trainer records the output path; keep only the name so the same corpus gives
        # the same bytes wherever it was trained.
        proto = read_model_proto(staged.with_name(staged.name + ".model"))
        proto.trainer_spec.model_prefix = out_prefix.name
        model_bytes = proto.SerializeToString()
        vocab_bytes = staged.with_name(staged.name + ".vocab").read_bytes()
        tokenizer = SpmTokenizer(model_bytes, registry, source=str(model_path))
        _check_round_trip(tokenizer, texts[:_SELF_CHECK_TEXTS])
        # The model last: a reader that finds the new model finds its vocabulary listing too.
        inputs_and_tags = [*inputs, registry.source]
        with critical_section():  # an interrupt between the two would pair a new .vocab with an old .model
            write_atomically(vocab_path, vocab_bytes, inputs=inputs_and_tags, option="--out")
            write_atomically(model_path, model_bytes, inputs=inputs_and_tags, option="--out")
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return TrainReport(model_path, tokenizer.vocab_size, len(documents), len(texts), skips.count)


def _check_round_trip(tokenizer: SpmTokenizer, texts: Sequence[str]) -> None:
    for text, ids in zip(texts, tokenizer.encode_texts(texts)):
        back = tokenizer.decode_text(ids)
        if back != text:
            raise RuntimeError(f"trained tokenizer {tokenizer.source} does not round-trip {text[:80]!r} "
                               f"(got {back[:80]!r}); this is a bug in metatrain's training settings")


@dataclasses.dataclass(frozen=True)
class ExtendReport:
    """What `extend_tokenizer` did.

    Attributes:
        out_path: the written model (an `epath.Path` for a bucket).
        added: tags appended, with their new ids.
        present: tags the base model already had as control pieces, with their ids.
        vocab_size: pieces in the written model.
    """

    out_path: StoragePath
    added: dict[str, int]
    present: dict[str, int]
    vocab_size: int


def extend_tokenizer(base: str | Path, registry: TagRegistry, out: str | Path) -> ExtendReport:
    """Appends the registry's tags to an existing SentencePiece model as control pieces.

    `base` and `out` may be local or in a bucket (`gs://`); a remote `out` is written as
    one whole object, which replaces any old one atomically.

    Every existing piece keeps its id; each missing tag gets one new id at the end, in
    registry order. Tags already present as control pieces are left alone, so running
    this again with the same tags writes the same model.

    Raises:
        UserError: the base is not a SentencePiece model, or has a tag as an ordinary
            (text-matched) piece, which cannot be turned into a tag without changing
            what existing ids mean.
    """
    check_output_file(out, inputs=[base, registry.source], option="--out")
    proto = read_model_proto(base)
    original = model_pb2.ModelProto()
    original.CopyFrom(proto)
    piece_type = model_pb2.ModelProto.SentencePiece
    index = {p.piece: i for i, p in enumerate(proto.pieces)}
    added: dict[str, int] = {}
    present: dict[str, int] = {}
    for tag in registry.tags:
        if tag in index:
            piece = proto.pieces[index[tag]]
            if piece.type != piece_type.CONTROL:
                kind = piece_type.Type.Name(piece.type).lower()
                raise UserError(
                    f"base model {base} already has {tag} as a {kind} piece (id {index[tag]}), which "
                    "matches raw text; it cannot become a tag without changing what that id means. "
                    f"Rename the tag in {registry.source}"
                )
            present[tag] = index[tag]
            continue
        new = proto.pieces.add()
        new.piece, new.score, new.type = tag, 0.0, piece_type.CONTROL
        index[tag] = added[tag] = len(proto.pieces) - 1
    proto.trainer_spec.vocab_size = len(proto.pieces)
    data = proto.SerializeToString()
    _check_extended(original, data, registry, out)
    out = write_atomically(out, data, inputs=[base, registry.source], option="--out")
    return ExtendReport(out, added, present, len(proto.pieces))


def _check_extended(base: model_pb2.ModelProto, data: bytes, registry: TagRegistry, out: str | Path) -> None:
    """Refuse (UserError, before `out` is touched) an extended model that does not pass the
    check every model meets when it is loaded, or that reads back with an old id changed or
    with text encoded differently from the base (tags are control pieces: text never
    produces one)."""
    try:
        tokenizer = SpmTokenizer(data, registry, source=str(out))
    except UserError as e:
        raise UserError(f"{e}; --out {out} was not written") from None
    except RuntimeError as e:  # SentencePiece's own loader refused the pieces
        raise UserError(f"SentencePiece cannot load the extended model ({e}); --out {out} was not written") from None
    changed = first_changed_id(base, parse_model_proto(data, source=str(out)))
    old = spm.SentencePieceProcessor(model_proto=base.SerializeToString())
    texts = [*registry.tags, " ".join(registry.tags)]
    if changed is not None or tokenizer.processor.encode(texts) != old.encode(texts):
        raise RuntimeError(f"extending the model changed id {changed} or how text encodes; this is a bug "
                           "in metatrain")
