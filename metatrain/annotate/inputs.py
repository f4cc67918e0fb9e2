"""The corpus `metatrain annotate` reads: raw text and metatrain documents, as `RawDocument`s.

Five kinds of input, told apart by file name (after `.jsonl` and `.txt` a compression
suffix `.gz`, `.zst`, `.bz2` or `.xz` may follow; see `metatrain.io.compression`):

- `*.jsonl`: one record per line, either raw text

      {"id": "a-1", "text": "The study found ...", "title": "...", "url": "..."}

  or a metatrain document (docs/design.md section 3), whose thinking is kept

      {"id": "a-2", "segments": [{"kind": "text", "text": "..."}], "mode": "human"}

  `id` is a string or an integer. A record without one gets `{file name}:{line}` (the
  name, not the path, so the ids stay the same when the corpus moves and a resumed run
  matches what an earlier run wrote). `mode` (default "human") is the document's mode
  in both forms. Every other top-level key is metadata, kept in its order.
- `*.parquet`: one row per document, with a `text` column (raw text) or a `segments`
  column (metatrain documents), optional `id` and `mode` columns, and every other
  column as metadata; `*.array_record`: one JSON record per document, as a `.jsonl`
  line (`metatrain.io.formats` says how; rows and records are numbered from 1, like lines).
- `*.txt`: the whole file is one document, its text exactly as in the file (UTF-8, a
  leading byte order mark dropped). Its id is the file name without `.txt` and the
  compression suffix (`notes/a.txt.gz` -> `a`); its metadata is empty (`path` says
  where it came from).
- a directory: its files of these kinds, sorted by name, not descending into
  subdirectories; other files in it are ignored.

An input that does not exist but holds `*`, `?` or `[` is a glob, expanded in sorted
order. Every input is resolved before the first record is read, so a misspelt third
input fails at once: an unmatched glob, a missing file, a file of another kind, an
empty directory or a file given twice is a `UserError`.

Inputs may be in object storage (`gs://b/docs/*.jsonl`, a `gs://b/docs` prefix as a
directory; see `metatrain.io.storage`): they are listed in and streamed from the bucket.

Bad records follow `metatrain.documents`: a `RecordError` (file, line, id, reason)
counted in a `SkipCounter` and skipped, or raised in strict mode. Besides what makes a
document invalid, a record is bad when it has both `text` and `segments` or neither,
when it has no text to annotate (empty or only whitespace), and when its id repeats an
earlier document's (resume relies on unique ids; the first one is kept).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from metatrain.documents import (
    DEFAULT_DOCUMENT_MODE,
    Segment,
    SkipCounter,
    parse_document,
)
from metatrain.errors import UserError
from metatrain.io.compression import (
    COMPRESSIONS,
    MAX_LINE_BYTES,
    LineTooLong,
    iter_lines,
)
from metatrain.io.formats import (
    JSONL,
    RecordError,
    describe_line_too_long,
    format_of,
    read_records,
)
from metatrain.io.storage import StoragePath, absolute, as_path, glob_paths, os_reason

#: Kinds of text input file, by the suffix before any compression suffix.
INPUT_KINDS: dict[str, str] = {".jsonl": "jsonl", ".txt": "txt"}
#: Kinds read without a compression suffix (they compress inside).
_BINARY_KINDS: tuple[str, ...] = (".parquet", ".array_record")
_BOM = b"\xef\xbb\xbf"
_GLOB_CHARS = frozenset("*?[")
_DOCUMENT_KEYS = frozenset({"id", "segments", "mode"})
_RAW_KEYS = frozenset({"id", "text", "mode"})


@dataclasses.dataclass(frozen=True)
class RawDocument:
    """One document to annotate.

    Attributes:
        id: the document's id (unique among the inputs of a run).
        segments: its segments: one text segment for raw text; a metatrain
            document's own segments, thinking included.
        mode: the document's mode ("human" unless the record says otherwise).
        metadata: the record's other top-level keys (e.g. title, url), in order.
        path: the file it was read from.
        line: its 1-based line in that file (1 for a `.txt` file).
    """

    id: str
    segments: tuple[Segment, ...]
    mode: str = DEFAULT_DOCUMENT_MODE
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    path: str = dataclasses.field(default="", compare=False)
    line: int = dataclasses.field(default=0, compare=False)

    @property
    def text(self) -> str:
        """The document's text: its text segments joined (thinking left out)."""
        return "".join(s.text for s in self.segments if s.kind == "text")


def input_kind(path: str | Path) -> str | None:
    """"jsonl", "txt", "parquet" or "array_record" for a file name metatrain annotate reads, else None."""
    kind = format_of(path)
    if kind != JSONL:
        return kind
    name = Path(path).name.lower()
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return next((kind for suffix, kind in INPUT_KINDS.items() if name.endswith(suffix)), None)


def _stem(path: Path) -> str:
    """The file name without its compression and kind suffixes (`a.txt.gz` -> `a`)."""
    name = path.name
    if name.lower().endswith(tuple(COMPRESSIONS)):
        name = name[: name.rfind(".")]
    return name[: name.rfind(".")] or name


def _supported(what: str) -> str:
    kinds = ", ".join([*(f"{s}{c}" for s in INPUT_KINDS for c in ("", *COMPRESSIONS)), *_BINARY_KINDS])
    return f"{what}; metatrain annotate reads {kinds} files and directories of them"


def expand_inputs(inputs: str | StoragePath | Sequence[str | StoragePath]) -> list[StoragePath]:
    """The files `inputs` name, in reading order (globs and directories expanded, sorted);
    remote ones (`gs://...`) are listed in their bucket.

    Raises:
        UserError: an unmatched glob, a missing file, a file of another kind, a
            directory with no input files, or the same file twice.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[StoragePath] = []
    for given in inputs:
        path = as_path(given)
        if not path.exists() and _GLOB_CHARS & set(str(given)):
            matches = sorted(glob_paths(given, recursive=False), key=str)
            if not matches:
                raise UserError(f"input {given}: the pattern matches no file")
            for match in matches:
                files += _files_of(match, given)
        elif not path.exists():
            raise UserError(f"input {given}: no such file or directory")
        else:
            files += _files_of(path, given)
    seen: dict[str, StoragePath] = {}
    for path in files:
        key = str(absolute(path))
        if key in seen:
            raise UserError(f"input {path} is given twice (also as {seen[key]}); name each file once")
        seen[key] = path
    return files


def _files_of(path: StoragePath, given: str | StoragePath) -> list[StoragePath]:
    if path.is_dir():
        found = sorted((p for p in path.iterdir() if p.is_file() and input_kind(p)), key=lambda p: p.name)
        if not found:
            raise UserError(_supported(f"input directory {path} holds no input files"))
        return found
    if input_kind(path) is None:
        raise UserError(_supported(f"input {path}{'' if str(path) == str(given) else f' (from {given})'} "
                                   "is not a .txt, .jsonl, .parquet or .array_record file"))
    return [path]


def read_raw_documents(
    inputs: str | Path | Sequence[str | Path],
    *,
    strict: bool = False,
    skips: SkipCounter | None = None,
) -> Iterator[RawDocument]:
    """Streams the documents of `inputs`, in order (see the module docstring for the formats).

    The inputs are resolved when this is called; the records are read as the iterator
    is consumed.

    Args:
        inputs: files, directories or globs, read one after another.
        strict: raise at the first bad record instead of skipping it.
        skips: counter for skipped records (a fresh one is used if None).

    Raises:
        UserError: from `expand_inputs`, at once; later, a damaged compressed file.
        RecordError: in strict mode, the first bad record; always, a file that cannot be
            opened (line 0).
    """
    files = expand_inputs(inputs)
    skips = SkipCounter() if skips is None else skips
    return _read_all(files, strict, skips)


def _read_all(files: list[Path], strict: bool, skips: SkipCounter) -> Iterator[RawDocument]:
    first_seen: dict[str, str] = {}
    for path in files:
        items = _read_txt(path) if input_kind(path) == "txt" else _read_records(path)
        for item in items:
            if isinstance(item, RawDocument):
                where = f"{item.path}:{item.line}"
                if item.id in first_seen:
                    item = RecordError(item.path, item.line, f"duplicate id (first at {first_seen[item.id]}); "
                                                             "give every document its own id", item.id)
                else:
                    first_seen[item.id] = where
                    yield item
                    continue
            if strict:
                raise item
            skips.add(item)


def _open_lines(path: Path) -> Iterator[bytes | LineTooLong]:
    """`iter_lines(path)`, with a file that cannot be opened raised as a `RecordError` at line 0."""
    lines = iter_lines(path)
    try:
        first = next(lines, None)
    except OSError as e:
        raise RecordError(str(path), 0, f"cannot open: {os_reason(e)}") from None
    return iter(()) if first is None else itertools.chain([first], lines)


def _read_txt(path: Path) -> Iterator[RawDocument | RecordError]:
    name, doc_id = str(path), _stem(path)
    parts, size = [], 0
    for number, line in enumerate(_open_lines(path), start=1):
        if isinstance(line, LineTooLong):  # never held: the document would be past any context
            yield RecordError(name, number, describe_line_too_long(line), doc_id)
            return
        size += len(line)
        if size > MAX_LINE_BYTES:  # one .txt file is one document: bounded like one record
            yield RecordError(name, number, f"the file passes {MAX_LINE_BYTES:,} bytes by line {number}, more "
                                            "than one document may hold; split it into several files", doc_id)
            return
        parts.append(line)
    data = b"".join(parts)  # lines keep their endings, so this is the file's bytes
    skip = len(_BOM) if data.startswith(_BOM) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = skip + e.start
        line = data.count(b"\n", 0, offset) + 1
        yield RecordError(name, line, f"invalid UTF-8 at byte {offset} of the file: "
                                      f"{data[offset:offset + 4]!r}", doc_id)
        return
    if not text.strip():
        yield RecordError(name, 1, "no text to annotate (the file is empty or only whitespace)", doc_id)
        return
    yield RawDocument(id=doc_id, segments=(Segment("text", text),), path=name, line=1)


def _read_records(path: Path) -> Iterator[RawDocument | RecordError]:
    for item in read_records(path, metadata=True):
        if isinstance(item, RecordError):
            yield item
            continue
        try:
            yield _parse_record(*item, path)
        except RecordError as e:
            yield e


def _parse_record(line: int, obj: Any, path: Path) -> RawDocument:
    name = str(path)
    if not isinstance(obj, Mapping):
        raise RecordError(name, line, f"a record must be a JSON object, got {type(obj).__name__}")
    has_text, has_segments = "text" in obj, "segments" in obj
    if has_text == has_segments:
        which = "both" if has_text else "neither"
        raise RecordError(name, line, f"a record has `text` (raw text) or `segments` (a metatrain "
                                      f"document), this one has {which}", _id_or_none(obj))
    default_id = f"{path.name}:{line}"
    if has_segments:
        doc = parse_document(obj, path=name, line=line)
        doc_id = default_id if obj.get("id") is None else doc.id
        segments, mode = doc.segments, doc.mode
        metadata = {k: v for k, v in obj.items() if k not in _DOCUMENT_KEYS}
    else:
        doc_id = _raw_id(obj, name, line, default_id)
        segments, mode = (_raw_text(obj, name, line, doc_id),), _raw_mode(obj, name, line, doc_id)
        metadata = {k: v for k, v in obj.items() if k not in _RAW_KEYS}
    if doc_id == "":
        raise RecordError(name, line, "`id` is empty; give the document an id or leave the key out")
    if not "".join(s.text for s in segments if s.kind == "text").strip():
        raise RecordError(name, line, "no text to annotate (the text segments are empty or only whitespace)",
                          doc_id)
    return RawDocument(id=doc_id, segments=segments, mode=mode, metadata=metadata, path=name, line=line)


def _id_or_none(obj: Mapping) -> str | None:
    raw_id = obj.get("id")
    return str(raw_id) if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else None


def _raw_id(obj: Mapping, name: str, line: int, default: str) -> str:
    raw_id = obj.get("id")
    if raw_id is None:
        return default
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise RecordError(name, line, f"`id` must be a string or an integer, got {type(raw_id).__name__}")
    _check_unicode(str(raw_id), "`id`", name, line, None)
    return str(raw_id)


def _raw_text(obj: Mapping, name: str, line: int, doc_id: str) -> Segment:
    text = obj["text"]
    if not isinstance(text, str):
        raise RecordError(name, line, f"`text` must be a string, got {type(text).__name__}", doc_id)
    _check_unicode(text, "`text`", name, line, doc_id)
    if not text.strip():
        raise RecordError(name, line, "no text to annotate (`text` is empty or only whitespace)", doc_id)
    return Segment("text", text)


def _raw_mode(obj: Mapping, name: str, line: int, doc_id: str) -> str:
    mode = obj.get("mode", DEFAULT_DOCUMENT_MODE)
    if not isinstance(mode, str) or not mode:
        raise RecordError(name, line, f"`mode` must be a non-empty string, got {mode!r:.60}", doc_id)
    return mode


def _check_unicode(text: str, what: str, name: str, line: int, doc_id: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordError(name, line, f"{what} contains a lone surrogate {text[e.start]!r} at character "
                                      f"{e.start}; text must be valid Unicode", doc_id) from None
