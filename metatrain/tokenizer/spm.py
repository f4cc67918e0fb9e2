"""Loading a SentencePiece model and checking it against the tag registry.

`SpmTokenizer` wraps a `sentencepiece.SentencePieceProcessor` whose vocabulary holds
every tag of a registry as a control piece (never matched in raw text). It encodes
plain text only; tags are added by `metatrain.tokenizer.encoder.Encoder` from a
document's structure. Training and extending models live in `build.py`.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from metatrain.errors import UserError
from metatrain.io.paths import DEFAULT_TAGS
from metatrain.io.storage import StoragePath, as_path, os_reason
from metatrain.tokenizer.registry import TagRegistry, load_registry

_META_SPACE = "\u2581"  # SentencePiece's whitespace symbol
_PIECE_TYPE_NAMES = {v: k.lower() for k, v in model_pb2.ModelProto.SentencePiece.Type.items()}


def parse_model_proto(data: bytes, *, source: str) -> model_pb2.ModelProto:
    """Parses a serialized SentencePiece model.

    Raises:
        UserError: `data` is not a SentencePiece model.
    """
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # protobuf raises DecodeError or RuntimeError, depending on backend
        raise UserError(f"{source} is not a SentencePiece model ({e}); pass a .model file "
                        "written by `metatrain tokenizer train` or by SentencePiece") from None
    if not proto.pieces:
        raise UserError(f"{source} is not a SentencePiece model (it has no pieces); pass a .model "
                        "file written by `metatrain tokenizer train` or by SentencePiece")
    return proto


def read_model_proto(path: str | StoragePath) -> model_pb2.ModelProto:
    """Reads and parses a `.model` file (local, or remote: `gs://...` is read from its
    bucket); raises `UserError` if unreadable or not a model."""
    try:
        data = as_path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read tokenizer {path}: {os_reason(e)}") from None
    return parse_model_proto(data, source=str(path))


def vocab_size_of(path: str | Path) -> int:
    """Pieces in a `.model` file (its vocabulary size); raises `UserError` if unreadable."""
    return len(read_model_proto(path).pieces)


def check_vocab_size(model_vocab_size: int, tokenizer: str | Path) -> None:
    """Refuse a model whose `vocab_size` is not the tokenizer's number of pieces.

    Too small and token ids index past the embedding table (NaN at the first step); too
    large and the extra rows are never trained, and generation refuses the run.

    Raises:
        UserError: one line with both sizes and the fix.
    """
    size = vocab_size_of(tokenizer)
    if size != model_vocab_size:
        raise UserError(
            f"model.vocab_size={model_vocab_size} but the tokenizer {tokenizer} has {size} pieces; "
            f"set model.vocab_size: {size} (--set model.vocab_size={size}) or point data.tokenizer "
            "at the tokenizer the model is sized for"
        )


def first_changed_id(old: model_pb2.ModelProto, new: model_pb2.ModelProto) -> tuple[int, str, str] | None:
    """`(id, old piece, new piece)` of the first id whose piece or type differs, None when
    `new` keeps every id of `old` (new ids may follow).

    A model that is shorter than `old` changes id `len(new.pieces)` (it is gone).
    """
    for i, piece in enumerate(old.pieces):
        if i >= len(new.pieces):
            return i, piece.piece, "<missing>"
        other = new.pieces[i]
        if other.piece != piece.piece or other.type != piece.type:
            return i, f"{piece.piece!r} ({_PIECE_TYPE_NAMES[piece.type]})", f"{other.piece!r} ({_PIECE_TYPE_NAMES[other.type]})"
    return None


def is_exact(proto: model_pb2.ModelProto) -> bool:
    """Whether every text round-trips exactly through a model with these settings.

    That needs the identity normaliser with no rule table, no dummy `▁` prefix, no
    whitespace squeezing, and byte fallback so no character becomes `<unk>`.
    """
    norm = proto.normalizer_spec
    return (
        norm.name == "identity"
        and not norm.precompiled_charsmap
        and not norm.add_dummy_prefix
        and not norm.remove_extra_whitespaces
        and proto.trainer_spec.byte_fallback
    )


class SpmTokenizer:
    """A SentencePiece model checked to hold every tag of `registry` as a control piece.

    Raises (from the constructor):
        UserError: a tag is missing or is not a control piece, or BOS/EOS is missing;
            the message names the tag and the `metatrain tokenizer extend` command.
    """

    def __init__(self, model: bytes, registry: TagRegistry, *, source: str = "<memory>"):
        self.source = source
        self.registry = registry
        self.proto = parse_model_proto(model, source=source)
        self.processor = spm.SentencePieceProcessor(model_proto=model)
        self.vocab_size: int = self.processor.get_piece_size()
        self.bos_id: int = self.processor.bos_id()
        self.eos_id: int = self.processor.eos_id()
        self.pad_id: int = self.processor.pad_id()
        self.unk_id: int = self.processor.unk_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise UserError(f"tokenizer {source} has no BOS or EOS piece (bos_id={self.bos_id}, "
                            f"eos_id={self.eos_id}); train it with `metatrain tokenizer train`")
        self.tag_ids: dict[str, int] = self._find_tags()
        self.exact: bool = is_exact(self.proto)
        self._meta_space_bytes: list[int] | None = self._byte_ids(_META_SPACE)

    def _find_tags(self) -> dict[str, int]:
        piece_ids = {p.piece: i for i, p in enumerate(self.proto.pieces)}
        missing = [t for t in self.registry.tags if t not in piece_ids]
        fix = (f"`metatrain tokenizer extend --base {self.source} --tags {self.registry.source} "
               f"--out NEW.model`")
        if missing:
            raise UserError(
                f"tokenizer {self.source} lacks tag(s) {', '.join(missing)} of the tag registry "
                f"{self.registry.source}; add them (existing ids stay as they are) with {fix}"
            )
        control = model_pb2.ModelProto.SentencePiece.CONTROL
        for tag in self.registry.tags:
            piece = self.proto.pieces[piece_ids[tag]]
            if piece.type != control:
                raise UserError(
                    f"tokenizer {self.source} has tag {tag} as a {_PIECE_TYPE_NAMES[piece.type]} piece, "
                    "so a literal tag in raw text would become the tag token; tags must be control "
                    "pieces. Train a new model with `metatrain tokenizer train`"
                )
        return {tag: piece_ids[tag] for tag in self.registry.tags}

    def _byte_ids(self, text: str) -> list[int] | None:
        """Byte-fallback ids spelling `text`, if the model has byte pieces and escapes spaces."""
        if not (self.proto.trainer_spec.byte_fallback and self.proto.normalizer_spec.escape_whitespaces):
            return None
        ids = [self.processor.piece_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]
        return ids if all(self.processor.is_byte(i) for i in ids) else None

    @classmethod
    def load(cls, path: str | StoragePath, registry: TagRegistry | None = None) -> "SpmTokenizer":
        """Loads a `.model` file and checks it against `registry` (default: the shipped tags).

        A remote file (`gs://...`) is read from its bucket into memory; SentencePiece
        loads the model from its bytes.
        """
        path = as_path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read tokenizer {path}: {os_reason(e)}") from None
        return cls(data, registry if registry is not None else load_registry(), source=str(path))

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, with one SentencePiece call for all of them.

        Text never produces a tag id (tags are control pieces). SentencePiece writes a
        space as `▁`, so a literal `▁` in the text is spelt with its byte pieces to
        come back as itself.
        """
        texts = list(texts)
        meta = self._meta_space_bytes
        if meta is None or not any(_META_SPACE in t for t in texts):
            return self.processor.encode(texts)
        parts_per_text = [t.split(_META_SPACE) for t in texts]
        encoded = iter(self.processor.encode([p for parts in parts_per_text for p in parts]))
        out = []
        for parts in parts_per_text:
            ids = list(next(encoded))
            for _ in parts[1:]:
                ids += meta
                ids += next(encoded)
            out.append(ids)
        return out

    def decode_text(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of plain (non-tag) token ids."""
        return self.processor.decode([int(i) for i in ids])

    def piece_type(self, token_id: int) -> str:
        """`normal`, `control`, `byte`, `unknown`, `user_defined` or `unused`."""
        return _PIECE_TYPE_NAMES[self.proto.pieces[token_id].type]


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """What `metatrain tokenizer inspect` reports about a model.

    Attributes:
        path: the model file.
        vocab_size: number of pieces.
        special: ids of bos, eos, unk and pad (-1 when absent).
        tags: every control piece other than BOS/EOS/PAD, with its id.
        missing_tags: registry tags the model lacks (fix with `tokenizer extend`).
        clashing_tags: registry tags the model has as pieces that are not control pieces
            (matched in raw text), with their id and piece type; `tokenizer extend` cannot
            make them tags, so the fix is renaming them in the registry.
        tags_source: the registry the tags were checked against.
        model_type: `bpe`, `unigram`, ...
        normalizer: name of the normalisation rule.
        byte_fallback: whether unseen characters become byte pieces.
        exact_round_trip: whether every text decodes back exactly (see `is_exact`).
    """

    path: str
    vocab_size: int
    special: dict[str, int]
    tags: dict[str, int]
    missing_tags: tuple[str, ...]
    model_type: str
    normalizer: str
    byte_fallback: bool
    exact_round_trip: bool
    clashing_tags: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)
    tags_source: str = str(DEFAULT_TAGS)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["missing_tags"] = list(self.missing_tags)
        out["clashing_tags"] = {tag: {"id": i, "type": kind} for tag, (i, kind) in self.clashing_tags.items()}
        return out

    def render(self) -> str:
        lines = [
            f"tokenizer:        {self.path}",
            f"vocab size:       {self.vocab_size}",
            f"model type:       {self.model_type}",
            f"normalizer:       {self.normalizer}",
            f"byte fallback:    {'yes' if self.byte_fallback else 'no'}",
            f"exact round trip: {'yes' if self.exact_round_trip else 'no (text may change on decode)'}",
            "special ids:      " + ", ".join(f"{k}={v}" for k, v in self.special.items()),
            f"tags ({len(self.tags)}):",
        ]
        lines += [f"  {tid:>7}  {tag}" for tag, tid in self.tags.items()]
        if self.clashing_tags:
            clashes = ", ".join(f"{tag} (id {i}, a {kind} piece)" for tag, (i, kind) in self.clashing_tags.items())
            lines.append(f"registry tags the model matches in raw text: {clashes}  (no tool can turn such a "
                         f"piece into a tag without changing what its id means: rename it in {self.tags_source})")
        if self.missing_tags:
            lines.append("missing registry tags: " + ", ".join(self.missing_tags) + f"  ({self._missing_fix()})")
        return "\n".join(lines)

    def _missing_fix(self) -> str:
        """What adds the missing tags: only a command `tokenizer extend` will carry out."""
        if self.special["bos"] < 0 or self.special["eos"] < 0:
            return "the model has no BOS or EOS piece, so adding tags cannot make it usable: train one with " \
                   "`metatrain tokenizer train`"
        if self.clashing_tags:
            return "add them with `tokenizer extend` once the tags above are renamed"
        command = shlex.join(["metatrain", "tokenizer", "extend", "--base", self.path, "--tags", self.tags_source,
                              "--out", "NEW.model"])
        return f"add them with `{command}`"


def inspect_tokenizer(path: str | Path, registry: TagRegistry | None = None) -> TokenizerInfo:
    """Describes a `.model` file; reports (does not refuse) tags missing from `registry`.

    Raises:
        UserError: the file cannot be read or is not a SentencePiece model.
    """
    registry = registry if registry is not None else load_registry()
    proto = read_model_proto(path)
    processor = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    special = {"bos": processor.bos_id(), "eos": processor.eos_id(),
               "unk": processor.unk_id(), "pad": processor.pad_id()}
    control = model_pb2.ModelProto.SentencePiece.CONTROL
    skip = {special["bos"], special["eos"], special["pad"]}
    tags = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == control and i not in skip}
    piece_ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    clashing = {t: (piece_ids[t], _PIECE_TYPE_NAMES[proto.pieces[piece_ids[t]].type]) for t in registry.tags
                if t in piece_ids and proto.pieces[piece_ids[t]].type != control}
    model_types = {v: k.lower() for k, v in model_pb2.TrainerSpec.ModelType.items()}
    return TokenizerInfo(
        path=str(path),
        vocab_size=len(proto.pieces),
        special=special,
        tags=tags,
        missing_tags=tuple(t for t in registry.tags if t not in tags and t not in clashing),
        clashing_tags=clashing,
        tags_source=str(registry.source),
        model_type=model_types.get(proto.trainer_spec.model_type, "unknown"),
        normalizer=proto.normalizer_spec.name or "(custom)",
        byte_fallback=bool(proto.trainer_spec.byte_fallback),
        exact_round_trip=is_exact(proto),
    )
