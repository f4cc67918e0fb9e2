"""Document sources with random access, and the readers that turn records into examples.

A source path (`SourceConfig.path`) is one of

    a JSON Lines file        data/corpus.jsonl, or compressed: data/corpus.jsonl.gz (.zst, .bz2, .xz)
    a Parquet file           data/corpus.parquet (rows: `text`, or `segments`; see `metatrain.io.formats`)
    an ArrayRecord file      data/corpus.array_record (each record one JSON document)
    a glob of them           data/shards/*.jsonl   (sorted, read as one source; a glob
                             ending in .jsonl also finds the compressed .jsonl.gz etc.)
    a token cache directory  written by `metatrain data cache` (see `cache.py`)

A file's format is told by its name (`metatrain.io.formats.format_of`; any name but
Parquet's and ArrayRecord's is read as JSON Lines). `open_records` gives random access
to the records of a source's files: `JsonlLines` for JSON Lines, `ParquetRows` and
`ArrayRecords` (in `metatrain.io.formats`) for the others.

Any of these may be in object storage (`gs://b/corpus.jsonl`, `gs://b/shards/*.jsonl`,
a token cache under `gs://b/cache`; see `metatrain.io.storage`), read through the
libraries' own file systems, never downloaded first: a remote plain JSON Lines file is
streamed once to index its lines, then each line is fetched by byte range; Parquet
row groups are read through a file handle on the object; ArrayRecord reads `gs://`
itself; a token cache's arrays are read by tensorstore.

A compressed file (local or remote) is decompressed once into a spill file under
`$TMPDIR`, which is what gets indexed and memory-mapped (`metatrain.io.compression` says why and what it costs);
records and errors still name the compressed file and its line numbers.

`JsonlLines` indexes the non-blank lines of its files once (byte offsets, found with
NumPy) so grain can shuffle and shard them without reading them (and refuse a line
longer than the bound, `data.max_line_bytes`, from its length alone); `JsonlReader` parses,
splits, encodes and shifts one record (a line, a row or an ArrayRecord record) when
grain asks for it. A record that cannot be used becomes `None` (grain skips it) and is
noted in the shared `SkipLog`; in strict mode it raises instead. Every other exception
is re-raised naming the record, so an error inside a worker process says which line
caused it.

Readers and sources are pickled into grain's worker processes: they carry paths and
small index arrays, and open files and the tokenizer lazily in each process.
"""

from __future__ import annotations

import array
import dataclasses
import functools
import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np

from metatrain.data.packing import shift_document
from metatrain.data.split import check_split, id_hash, in_split
from metatrain.documents import parse_record
from metatrain.errors import UserError
from metatrain.io.compression import COMPRESSIONS, MAX_LINE_BYTES, LineTooLong, random_access_path
from metatrain.io.formats import ARRAY_RECORD, JSONL, PARQUET, ArrayRecords, ParquetRows, RecordError, format_of
from metatrain.io.storage import StoragePath, as_path, file_size, glob_paths, is_remote, os_reason, read_range

_INDEX_CHUNK = 64 << 20  # bytes scanned at a time when indexing lines
_GLOB_CHARS = frozenset("*?[")


def expand_jsonl_paths(path: str | StoragePath) -> list[StoragePath]:
    """The files a source path names (a file, or the sorted files of a glob), of any format.

    A glob ending in `.jsonl` also matches the compressed files beside them
    (`*.jsonl` finds `a.jsonl` and `b.jsonl.gz`). A remote path (`gs://...`) gives
    remote paths; a remote glob is matched by listing the bucket.

    Raises:
        UserError: the file does not exist or is a directory, the glob matches no
            file, or it matches one corpus both plain and compressed.
    """
    text = str(path)
    if _GLOB_CHARS & set(text):
        patterns = [text, *(text + suffix for suffix in COMPRESSIONS)] if text.endswith(".jsonl") else [text]
        found = {str(p): p for pattern in patterns for p in glob_paths(pattern, files_only=True)}
        files = sorted(found.values())
        if not files:
            raise UserError(f"data source {text}: the glob matches no file")
        _refuse_twins(text, files)
        return files
    p = as_path(path)
    if p.is_dir():
        raise UserError(f"data source {text} is a directory, and not a token cache (it has no cache.json); "
                        f"to read its JSON Lines files give a glob such as {p / '*.jsonl'}")
    if not p.is_file() and p.exists():
        raise UserError(f"data source {text} is not a regular file (a device, FIFO or socket), and training "
                        "reads its records by byte offset; give a JSON Lines, Parquet or ArrayRecord file")
    if not p.is_file():
        raise UserError(f"data source {text} does not exist (expected a JSON Lines, Parquet or ArrayRecord "
                        "file, a glob of them, or a token cache)")
    return [p]


def _refuse_twins(pattern: str, files: list[StoragePath]) -> None:
    """A glob that finds `a.jsonl` and `a.jsonl.gz` would read the same documents twice."""
    names = {str(f) for f in files}
    for f in files:
        for suffix in COMPRESSIONS:
            if str(f) + suffix in names:
                raise UserError(f"data source {pattern} matches both {f} and {f}{suffix}; its documents "
                                "would be read twice: remove one, or narrow the glob")


def _index_lines(path: StoragePath) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start and end byte offsets and 1-based line numbers of the non-blank lines of a file.

    A local file is memory-mapped; a remote one is streamed from its bucket once.
    """
    size = file_size(path)
    if size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    nl, before, last = (_remote_newlines if is_remote(str(path)) else _local_newlines)(path, size)
    ends = nl if (len(nl) and nl[-1] == size - 1) else np.append(nl, size)
    starts = np.concatenate([[0], nl + 1])[: len(ends)]
    # A line is blank when it is empty or only "\r"; lines of other whitespace are
    # rare and are dropped by the reader instead (they cost a parse, not an error).
    lengths = ends - starts
    end_bytes = before if len(ends) == len(nl) else np.append(before, last)  # the byte before each end
    blank = (lengths == 0) | ((lengths == 1) & (end_bytes == 13))
    keep = np.flatnonzero(~blank)
    return starts[keep], ends[keep], keep + 1


def _local_newlines(path: StoragePath, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Offsets of the newlines of a local file, the byte before each, and the file's last byte."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    newlines = [np.flatnonzero(data[i:i + _INDEX_CHUNK] == 10) + i for i in range(0, size, _INDEX_CHUNK)]
    nl = np.concatenate(newlines).astype(np.int64)
    before, last = data[np.maximum(nl - 1, 0)], int(data[size - 1])
    del data
    return nl, before, last


def _remote_newlines(path: StoragePath, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """`_local_newlines` of a remote file, read as one stream of chunks."""
    newlines, befores = [], []
    offset, previous = 0, 10  # a newline at offset 0 has no byte before it (like a memory map's data[0])
    with path.open("rb") as handle:
        while chunk := handle.read(_INDEX_CHUNK):
            data = np.frombuffer(chunk, np.uint8)
            at = np.flatnonzero(data == 10)
            newlines.append(at.astype(np.int64) + offset)
            befores.append(np.where(at > 0, data[np.maximum(at - 1, 0)], previous).astype(np.uint8))
            offset, previous = offset + len(data), int(data[-1])
    return np.concatenate(newlines), np.concatenate(befores), previous


def _random_access(path: StoragePath) -> StoragePath:
    try:
        return random_access_path(path)
    except OSError as e:
        raise UserError(f"data source {path}: cannot open: {os_reason(e)}") from None


class JsonlLines:
    """Random access to the non-blank lines of one or more JSON Lines files.

    `lines[i]` is `(path, line_number, raw_bytes)`; it implements grain's
    `RandomAccessDataSource` (`__len__`, `__getitem__`). A compressed file is read
    from its decompressed spill file; `path` still names the compressed file. A local
    plain file is memory-mapped; a remote one (`gs://...`) is streamed once to index
    it, and each line is then fetched by a ranged request. A line longer than
    `max_line_bytes` (its newline not counted) is known from the index and never read:
    its raw bytes are a `LineTooLong`, which the reader counts as a bad record.
    """

    def __init__(self, files: list[StoragePath], *, max_line_bytes: int = MAX_LINE_BYTES):
        self.files = [str(f) for f in files]  # the names records and errors report
        self.max_line_bytes = max_line_bytes
        self._data_files = [str(_random_access(as_path(f))) for f in self.files]  # what is read
        starts, ends, numbers = zip(*(_index_lines(as_path(f)) for f in self._data_files)) if files else ((), (), ())
        self._starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self._ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        self._numbers = np.concatenate(numbers) if numbers else np.zeros(0, np.int64)
        counts = [len(s) for s in starts]
        self._file_bounds = np.cumsum([0, *counts])
        self._maps: dict[int, np.memmap] | None = None

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> tuple[str, int, bytes | LineTooLong]:
        file_index = int(np.searchsorted(self._file_bounds, index, side="right")) - 1
        name = self._data_files[file_index]
        length = int(self._ends[index] - self._starts[index])
        if length > self.max_line_bytes:
            return self.files[file_index], int(self._numbers[index]), LineTooLong(length, self.max_line_bytes, True)
        if is_remote(name):
            raw = read_range(name, int(self._starts[index]), int(self._ends[index]))
            return self.files[file_index], int(self._numbers[index]), raw
        if self._maps is None:
            self._maps = {}
        data = self._maps.get(file_index)
        if data is None:
            data = self._maps[file_index] = np.memmap(name, dtype=np.uint8, mode="r")
        raw = data[self._starts[index]:self._ends[index]].tobytes()
        return self.files[file_index], int(self._numbers[index]), raw

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = None  # memory maps are reopened in each process
        return state

    def __repr__(self) -> str:
        return f"JsonlLines({len(self.files)} files, {len(self)} lines)"


class ConcatRecords:
    """The records of several random-access sources, one after another."""

    def __init__(self, parts: list):
        self.parts = parts
        self._bounds = np.cumsum([0, *map(len, parts)], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._bounds[-1])

    def __getitem__(self, index: int):
        k = int(np.searchsorted(self._bounds, index, side="right")) - 1
        return self.parts[k][index - int(self._bounds[k])]


def open_records(files: list[StoragePath], *, max_line_bytes: int = MAX_LINE_BYTES):
    """Random access to the records of `files`, in order: `records[i]` is `(path, number, raw)`.

    Consecutive files of one format share one index (`JsonlLines`, `ParquetRows`,
    `ArrayRecords`); `metatrain.io.formats.load_record` turns `raw` into a record. A
    JSON Lines line longer than `max_line_bytes` is a bad record, never read.

    Raises:
        UserError: a file cannot be opened, or is not valid Parquet or ArrayRecord.
    """
    opener = {JSONL: functools.partial(JsonlLines, max_line_bytes=max_line_bytes), PARQUET: ParquetRows,
              ARRAY_RECORD: ArrayRecords}
    parts = [opener[kind](list(group)) for kind, group in itertools.groupby(files, format_of)]
    return parts[0] if len(parts) == 1 else ConcatRecords(parts)


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """What builds the encoder; the encoder itself is built lazily in each process."""

    tokenizer: str
    tags: str
    mantra: str | None
    mantra_policy: str

    def build(self):
        from metatrain.tokenizer import DEFAULT_MANTRA, Encoder

        mantra = DEFAULT_MANTRA if self.mantra is None else self.mantra
        return Encoder.from_files(self.tokenizer, self.tags, mantra=mantra, mantra_policy=self.mantra_policy)


#: Reasons a `SkipLog` keeps whole per batch; the other skips of the batch travel as file
#: and line only (enough to count each record once), so a long run of bad records costs a
#: few bytes each, not its message.
KEPT_REASONS = 10
#: Bad records a stream skips between two batches before it gives up, at the least (see
#: `SkipLog`): a tiny corpus may read itself many times per batch without being hopeless.
MIN_SKIPS_BEFORE_GIVING_UP = 10_000
_REASON_NOT_KEPT = "(reason not kept: one of many bad records read for one batch)"


@dataclasses.dataclass
class Skipped:
    """The records skipped for one batch: `files[k]`, `lines[k]`, and the first few reasons.

    Iterating gives `RecordError`s, in the order the records were skipped; those past the
    first `KEPT_REASONS` carry a placeholder reason.
    """

    paths: list[str] = dataclasses.field(default_factory=list)
    files: array.array = dataclasses.field(default_factory=lambda: array.array("i"))
    lines: array.array = dataclasses.field(default_factory=lambda: array.array("q"))
    examples: list[tuple[str, int, str, str | None]] = dataclasses.field(default_factory=list)  # pickles

    def __len__(self) -> int:
        return len(self.lines)

    def __iter__(self):
        yield from (RecordError(*example) for example in self.examples)
        for k in range(len(self.examples), len(self.lines)):
            yield RecordError(self.paths[self.files[k]], int(self.lines[k]), _REASON_NOT_KEPT)


class SkipLog:
    """Records skipped by readers, waiting to be reported to the main process.

    Readers `add` each skipped record; the batch iterator `drain`s them into each batch,
    so that skips made inside worker processes reach the `SkipCounter` of the main
    process. Between two batches a record costs its file and line (12 bytes), its reason
    only for the first `KEPT_REASONS`.

    Args:
        give_up_after: bad records skipped between two batches after which the stream
            cannot make a batch and stops (`UserError`); None: never (a finite stream, or
            one drained after every record).
        batch: what the stream makes, for that message (e.g. "a batch of 8x128 positions").
    """

    def __init__(self, give_up_after: int | None = None, batch: str = "a batch") -> None:
        self.give_up_after = give_up_after
        self.batch = batch
        self._pending = Skipped()
        self._path_index: dict[str, int] = {}

    def add(self, error: RecordError) -> None:
        """Note one skipped record.

        Raises:
            UserError: more than `give_up_after` records were skipped since the last batch.
        """
        pending = self._pending
        index = self._path_index.get(error.path)
        if index is None:
            index = self._path_index[error.path] = len(pending.paths)
            pending.paths.append(error.path)
        pending.files.append(index)
        pending.lines.append(int(error.line))
        if len(pending.examples) < KEPT_REASONS:
            pending.examples.append((error.path, error.line, error.reason, error.doc_id))
        if self.give_up_after is not None and len(pending) > self.give_up_after:
            first = "; ".join(str(RecordError(*e)) for e in pending.examples[:2])
            raise UserError(
                f"data: {len(pending)} bad records skipped since the last batch, more than a whole pass over the "
                f"training data ({self.give_up_after} records), and still not {self.batch}: too few good records "
                f"to train on; fix or remove the bad records, or add documents (the first: {first})"
            )

    def drain(self) -> Skipped:
        """The records skipped since the last drain (a batch was made); the log starts afresh."""
        out, self._pending, self._path_index = self._pending, Skipped(), {}
        return out


class RecordFailure(RuntimeError):
    """An unexpected error while reading one record; the message names the record."""


class JsonlReader:
    """One record (a JSON Lines line, a Parquet row, an ArrayRecord record) -> training
    example, or None (blank, other split, skipped).

    Args:
        encoder: how to build the encoder.
        split: keep documents of this split ("train" or "eval"); None keeps all.
        eval_fraction: share of documents held out for eval.
        strict: raise `UserError` on a bad record instead of skipping it.
        skips: where skipped records are noted.
    """

    def __init__(
        self, encoder: EncoderSpec, *, split: str | None, eval_fraction: float, strict: bool, skips: SkipLog
    ):
        self.encoder_spec = encoder
        self.split = None if split is None else check_split(split)
        self.eval_fraction = eval_fraction
        self.strict = strict
        self.skips = skips
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = self.encoder_spec.build()
        return self._encoder

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_encoder"] = None  # SentencePiece does not pickle; rebuilt in each process
        return state

    def __call__(self, record: tuple[str, int, bytes | Mapping | LineTooLong]) -> dict[str, np.ndarray] | None:
        encoded = self.encode_record(record)
        return None if encoded is None else shift_document(encoded.ids, encoded.roles)

    def encode_record(self, record: tuple[str, int, bytes | Mapping | LineTooLong]):
        """The record's `EncodedDocument`, or None when it is blank, of the other split or skipped.

        Raises:
            UserError: a bad record in strict mode (the message names file and line).
            RecordFailure: any other error, naming the record.
        """
        path, line, raw = record
        try:
            return self._encode(path, line, raw)
        except (RecordError, UserError):
            raise
        except Exception as e:  # a bug or an unexpected failure: say which record
            raise RecordFailure(f"{path}:{line}: unexpected error while reading this record: {e!r}") from e

    def _encode(self, path: str, line: int, raw: bytes | Mapping | LineTooLong):
        from metatrain.tokenizer import EncodeError

        try:
            doc = parse_record(raw, path=path, line=line)
            if doc is None:
                return None
            if self.split is not None and not in_split(id_hash(doc.id), self.split, self.eval_fraction):
                return None
            try:
                return self.encoder.encode(doc)
            except EncodeError as e:
                raise e.record_error() from None
        except RecordError as e:
            if self.strict:
                raise UserError(f"bad record (strict mode is on): {e}") from None
            self.skips.add(e)
            return None
