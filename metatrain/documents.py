"""Documents: the JSON Lines input format (docs/design.md section 3) and its validating reader.

One document per line:

    {"id": "doc-1", "mode": "human",
     "segments": [{"kind": "text", "text": "The study found ..."},
                  {"kind": "thinking", "text": "Twenty-three percent ...", "control": "good"}]}

`mode` (document and segment) and `control` are optional. Which modes and controls
exist is the tag registry's business, so the encoder checks them; this module checks
the structure of each record. Extra keys on a document are kept out of the way (they
are metadata); extra keys on a segment are refused, because a misspelt `"mdoe"` would
otherwise silently put AI text in human mode.

Bad records never stop a run by default: `read_documents` reports each one (file,
line, document id, reason), counts it in a `SkipCounter` and goes on. `parse_record`
turns one raw record into a `Document` for both read paths (this streaming one, and the
random-access one in `metatrain.data.sources`): invalid UTF-8, invalid JSON, a repeated
key and records past the limits of `metatrain.io.strict_parsing` (too deep, a number too
large, a key too long) are all record errors. A UTF-8 byte order mark at the start of
a line is ignored (editors put one at the start of a file; `cat` carries it inside).
Files named `.jsonl.gz`, `.jsonl.zst`, `.jsonl.bz2` or `.jsonl.xz` are decompressed
as they are read (`metatrain.io.compression`). The same documents may come as Parquet rows
or ArrayRecord records (`metatrain.io.formats`), checked by the same code.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from metatrain.errors import UserError
from metatrain.io.compression import MAX_LINE_BYTES, LineTooLong
from metatrain.io.formats import RecordError, load_record, read_records
from metatrain.io.storage import StoragePath, as_path, glob_paths, is_remote

logger = logging.getLogger(__name__)

SEGMENT_KINDS: tuple[str, ...] = ("text", "thinking")
DEFAULT_DOCUMENT_MODE = "human"
_SEGMENT_KEYS = frozenset({"kind", "text", "mode", "control"})
_REPR_LIMIT = 60  # characters of a bad value quoted in a message
_GLOB_CHARS = frozenset("*?[")


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of text or one thinking block.

    Attributes:
        kind: "text" or "thinking".
        text: the segment's text, exactly as it must come back from decoding.
        mode: mode to switch to before this segment; None keeps the current mode.
        control: name of a control token (e.g. "good") put before this segment.
    """

    kind: str
    text: str
    mode: str | None = None
    control: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(f"unknown segment kind {self.kind!r}; expected one of {', '.join(SEGMENT_KINDS)}")


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: its segments, and the mode it is written in.

    Attributes:
        id: the document's id (from the record, or `file:line` when it has none).
        segments: the segments in order, at least one.
        mode: the document's mode; "ai" makes the whole document AI text.
        path: file the document was read from ("" when built in code).
        line: 1-based line (Parquet row, ArrayRecord record) in that file (0 when built in code).
    """

    id: str
    segments: tuple[Segment, ...]
    mode: str = DEFAULT_DOCUMENT_MODE
    path: str = dataclasses.field(default="", compare=False)
    line: int = dataclasses.field(default=0, compare=False)


@dataclasses.dataclass
class SkipCounter:
    """Counts bad records and keeps the first few messages (shared with the data pipeline).

    A record is counted once however often it is read (the next epoch, the eval stream
    read it again): the counter remembers which it has counted in one bitmap per file, a
    bit per line up to the last bad one, so 3 million bad records of a file cost under
    400 KB, not a Python object each.

    Attributes:
        max_messages: how many messages to keep and log; later skips are only counted.
        count: distinct records skipped so far.
        messages: the first `max_messages` reasons, as `file:line (document id): reason`.
    """

    max_messages: int = 10
    count: int = 0
    messages: list[str] = dataclasses.field(default_factory=list)
    _seen: dict[str, bytearray] = dataclasses.field(default_factory=dict, repr=False)

    def add(self, error: RecordError) -> None:
        """Counts one skipped record; logs it if it is among the first `max_messages`.

        A record already counted (same file and line) is neither counted nor logged
        again, so `count` and the log agree.
        """
        if not self._mark(str(error.path), int(error.line)):
            return
        self.count += 1
        if len(self.messages) < self.max_messages:
            self.messages.append(str(error))
            logger.warning("skipping bad record: %s", error)
            if len(self.messages) == self.max_messages:
                logger.warning("further bad records are counted but not logged")

    def _mark(self, path: str, line: int) -> bool:
        """Sets the bit of `line` of `path`; whether it was clear (the record is new)."""
        bits = self._seen.setdefault(path, bytearray())
        byte, mask = line >> 3, 1 << (line & 7)
        if byte >= len(bits):
            bits.extend(bytes(byte + 1 - len(bits)))
        if bits[byte] & mask:
            return False
        bits[byte] |= mask
        return True

    def summary(self) -> str:
        """One line for the end of a run, e.g. `skipped 3 bad records`."""
        plural = "" if self.count == 1 else "s"
        return f"skipped {self.count} bad record{plural}"


def _short_repr(value: Any) -> str:
    """`repr(value)`, cut to `_REPR_LIMIT` characters: a message never quotes a megabyte."""
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[:_REPR_LIMIT] + f"... ({len(text)} characters)"


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{where} contains a lone surrogate {text[e.start]!r} at character {e.start}; "
            "text must be valid Unicode (fix the \\ud800-style escape that produced it)"
        ) from None


def _parse_segment(obj: Any, index: int) -> Segment:
    where = f"segment {index}"
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} must be an object, got {type(obj).__name__}")
    unknown = set(obj) - _SEGMENT_KEYS
    if unknown:
        raise ValueError(
            f"{where} has unknown key(s) {sorted(unknown)}; a segment has only {', '.join(sorted(_SEGMENT_KEYS))}"
        )
    if "kind" not in obj:
        raise ValueError(f"{where} has no `kind`; expected one of {', '.join(SEGMENT_KINDS)}")
    kind = obj["kind"]
    if kind not in SEGMENT_KINDS:
        raise ValueError(f"{where} has unknown kind {_short_repr(kind)}; expected one of {', '.join(SEGMENT_KINDS)}")
    if "text" not in obj:
        raise ValueError(f"{where} has no `text`")
    text = obj["text"]
    if not isinstance(text, str):
        raise ValueError(f"{where}: `text` must be a string, got {type(text).__name__}")
    _check_text(text, f"{where} text")
    if kind == "text" and not text:
        raise ValueError(f"{where}: a text segment needs non-empty `text` (drop the segment)")
    for key in ("mode", "control"):
        value = obj.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{where}: `{key}` must be a non-empty string, got {_short_repr(value)}")
    return Segment(kind=kind, text=text, mode=obj.get("mode"), control=obj.get("control"))


def parse_document(obj: Any, *, path: str, line: int) -> Document:
    """Validates one parsed JSON record and builds its `Document`.

    Raises:
        RecordError: the record is not a valid document; says where and why.
    """
    doc_id: str | None = None
    try:
        if not isinstance(obj, Mapping):
            raise ValueError(f"a document must be a JSON object, got {type(obj).__name__}")
        raw_id = obj.get("id")
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int, type(None))):
            raise ValueError(f"`id` must be a string or an integer, got {type(raw_id).__name__}")
        doc_id = None if raw_id is None else str(raw_id)
        if doc_id is not None:
            _check_text(doc_id, "`id`")
        if "segments" not in obj:
            raise ValueError("missing `segments` (a list of {kind, text} objects)")
        segments = obj["segments"]
        if not isinstance(segments, list):
            raise ValueError(f"`segments` must be a list, got {type(segments).__name__}")
        if not segments:
            raise ValueError("`segments` is empty; a document needs at least one segment")
        mode = obj.get("mode", DEFAULT_DOCUMENT_MODE)
        if not isinstance(mode, str) or not mode:
            raise ValueError(f"`mode` must be a non-empty string, got {_short_repr(mode)}")
        parsed = tuple(_parse_segment(s, i) for i, s in enumerate(segments))
    except ValueError as e:
        raise RecordError(path, line, str(e), doc_id) from None
    return Document(
        id=doc_id if doc_id is not None else f"{path}:{line}",
        segments=parsed,
        mode=mode,
        path=path,
        line=line,
    )


def parse_record(raw: bytes | Mapping | LineTooLong, *, path: str, line: int) -> Document | None:
    """The `Document` of one raw record (a JSON Lines line, an ArrayRecord record or a
    Parquet row; see `metatrain.io.formats.load_record`), or None for a blank line.

    Raises:
        RecordError: the record is a line past the bound on its length, not valid
            UTF-8, not JSON, past the JSON limits (`metatrain.io.strict_parsing`), or not
            a valid document.
    """
    obj = load_record(raw, path=path, line=line)
    return None if obj is None else parse_document(obj, path=path, line=line)


def _read_one_file(path: StoragePath, max_line_bytes: int) -> Iterator[Document | RecordError]:
    name = str(path)
    for item in read_records(path, max_line_bytes=max_line_bytes):
        if isinstance(item, RecordError):
            yield item
            continue
        number, obj = item
        try:
            yield parse_document(obj, path=name, line=number)
        except RecordError as e:
            yield e


def read_documents(
    paths: str | StoragePath | Iterable[str | StoragePath],
    *,
    strict: bool = False,
    skips: SkipCounter | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[Document]:
    """Streams the valid documents of one or more files, in order.

    A file is JSON Lines, Parquet or ArrayRecord, by its name (`metatrain.io.formats`);
    blank lines are ignored; compressed files (by name) are decompressed. A bad
    record (invalid UTF-8, invalid JSON, too deep, a number too large or a key too
    long, an invalid document, a JSON Lines line longer than `max_line_bytes`) is skipped,
    counted in `skips` and, for the first few, logged with file:line, document id and
    reason; every good record before and after it is still yielded. A line past the
    bound is never held whole; a file that has no line end long past it (`/dev/zero`) is
    one bad record and read no further.

    A file may be in object storage (`gs://b/docs.jsonl`), streamed from its bucket;
    a remote glob (`gs://b/shards/*.jsonl`, which no shell expands) is expanded into its
    files, sorted.

    Args:
        paths: a file, or several files read one after another.
        strict: raise at the first bad record instead of skipping it.
        skips: counter for skipped records (a fresh one is used if None).
        max_line_bytes: the longest JSON Lines line read (its newline not counted).

    Raises:
        RecordError: in strict mode, the first bad record; always, a file that
            cannot be opened (line 0).
        UserError: a compressed file with a plain name, a damaged compressed file, a
            file that is not valid Parquet or ArrayRecord, or a remote glob that matches
            no file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    skips = SkipCounter() if skips is None else skips
    for path in (f for given in paths for f in _files(given)):
        for item in _read_one_file(path, max_line_bytes):
            if isinstance(item, RecordError):
                if strict:
                    raise item
                skips.add(item)
            else:
                yield item


def _files(path: str | StoragePath) -> list[StoragePath]:
    """`path`, or the files a remote glob matches (sorted)."""
    if not (is_remote(path) and _GLOB_CHARS & set(str(path))):
        return [as_path(path)]
    files = glob_paths(path, files_only=True)
    if not files:
        raise UserError(f"input {path}: the pattern matches no file")
    return files
