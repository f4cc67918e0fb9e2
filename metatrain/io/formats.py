"""Corpus files and the records in them: JSON Lines lines, Parquet rows, ArrayRecord records.

A file's name says its format (`format_of`):

    *.parquet                     Parquet
    *.array_record                ArrayRecord (TFDS-style shards too: *.array_record-00000-of-00008)
    anything else                 JSON Lines, plain or compressed (`metatrain.io.compression`)

Records are numbered from 1 in their file, like lines (0 names the file itself in a
`RecordError`). `load_record` turns one raw record into the JSON value a JSON Lines line
parses to, so that `metatrain.documents.parse_document` (and the annotate reader) check
records of every format with the same code and the same messages:

- a JSON Lines line, or an ArrayRecord record (the same bytes: one JSON document),
  parsed within the limits of `metatrain.io.strict_parsing`; a blank one is no record;
  a line longer than the bound (`metatrain.io.compression.MAX_LINE_BYTES`, or the
  setting) is a bad record read no further than the bound;
- a Parquet row, a dict of its columns. A file with a `segments` column holds metatrain
  documents: a list of structs {kind, text, mode?, control?}, or the JSON text of that
  list. A file with a `text` column holds text-only documents: the text becomes the
  document's one text segment (null or empty text is a bad row). `id` (string or
  integer) and `mode` columns are optional; with an `id` column every row needs one (a
  null id is a bad row), and a null `mode` is the default mode. Other columns are
  metadata: `metatrain annotate` keeps them, training and `encode` do not read them.

Two ways in, as for compressed JSON Lines:

- `read_records(path)` streams a file's records in order, a Parquet file one row group
  at a time (`metatrain.documents.read_documents`, `metatrain annotate`);
- `ParquetRows` and `ArrayRecords` give grain random access (beside
  `metatrain.data.sources.JsonlLines`): `records[i]` is `(path, number, raw record)`.
  Both are pickled into grain's worker processes and open their files lazily there.

Every file may be in object storage (`gs://...`, see `metatrain.io.storage`), read where it
lies: JSON Lines as a stream, Parquet through pyarrow on the bucket's fsspec file system
(the footer, then only the row groups read), ArrayRecord by its own `gs://` client.

A file that is not valid Parquet or ArrayRecord is a `UserError` naming it.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from metatrain.errors import UserError
from metatrain.io.compression import MAX_LINE_BYTES, LineTooLong, iter_lines
from metatrain.io.storage import StoragePath, as_path, is_remote, os_reason
from metatrain.io.strict_parsing import DuplicateKeyError, JsonLimitError, describe_json_error, loads_json

JSONL, PARQUET, ARRAY_RECORD = "jsonl", "parquet", "array_record"
_ARRAY_RECORD_NAME = re.compile(r"\.array_record(-\d+-of-\d+)?$")
_BOM = b"\xef\xbb\xbf"
_DOCUMENT_COLUMNS = ("id", "segments", "text", "mode")  # what training reads of a Parquet file
_CACHED_ROW_GROUPS = 2  # decoded row groups kept per process: reading in order decodes each once
_READ_BATCH = 1024  # ArrayRecord records read at a time when streaming


def format_of(path: str | Path) -> str:
    """`PARQUET`, `ARRAY_RECORD` or `JSONL` (every other name), from a file's name."""
    name = Path(path).name.lower()
    if name.endswith(".parquet"):
        return PARQUET
    return ARRAY_RECORD if _ARRAY_RECORD_NAME.search(name) else JSONL


@dataclasses.dataclass(frozen=True)
class RecordError(UserError):
    """One invalid input record.

    Attributes:
        path: file the record came from.
        line: 1-based line number in that file (row of a Parquet file, record of an
            ArrayRecord file; 0: the file itself).
        reason: why the record was refused.
        doc_id: the document's `id`, when it could be read.
    """

    path: str
    line: int
    reason: str
    doc_id: str | None = None

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}"
        if self.line > 0:  # rows of a Parquet file and records of an ArrayRecord file are not lines
            kind = format_of(self.path)
            if kind == PARQUET:
                where = f"{self.path}, row {self.line}"
            elif kind == ARRAY_RECORD:
                where = f"{self.path}, record {self.line}"
        if self.doc_id is not None:
            where += f" (document {self.doc_id!r})"
        return f"{where}: {self.reason}"


# -- one raw record -> its JSON value -------------------------------------------------------


def load_record(raw: bytes | Mapping | LineTooLong, *, path: str, line: int) -> Any:
    """The JSON value of one raw record, or None for a blank line.

    `raw` is a JSON Lines line or an ArrayRecord record (bytes; a leading BOM is
    ignored), a Parquet row (a dict of its columns, see the module docstring), or a
    JSON Lines line past the bound on its length (`LineTooLong`, never read).

    Raises:
        RecordError: the line is too long; the bytes are not valid UTF-8, not JSON, or
            past the JSON limits (`metatrain.io.strict_parsing`); a Parquet row has a
            null id, a null or empty text.
    """
    if isinstance(raw, Mapping):
        return _row_value(raw, path=path, line=line)
    if isinstance(raw, LineTooLong):
        raise RecordError(path, line, describe_line_too_long(raw))
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    if not raw.strip():
        return None
    try:
        text = raw.rstrip(b"\r\n").decode("utf-8")  # so `json` counts columns on this line
    except UnicodeDecodeError as e:
        raise RecordError(path, line, f"invalid UTF-8 at byte {e.start} of the line: "
                                      f"{raw[e.start:e.start + 4]!r}") from None
    try:
        return loads_json(text)
    except json.JSONDecodeError as e:
        raise RecordError(path, line, f"invalid JSON: {describe_json_error(e)}") from None
    except DuplicateKeyError as e:
        raise RecordError(path, line, f"invalid JSON: {e}") from None
    except JsonLimitError as e:
        raise RecordError(path, line, str(e)) from None


def describe_line_too_long(line: LineTooLong) -> str:
    """Why a line past the bound is a bad record, and what to do about it."""
    if not line.ended:
        return (f"no line end within {line.length} bytes (the limit on a line is {line.limit} bytes); is it a "
                "JSON Lines file? The rest of the file was not read")
    return (f"the line is {line.length} bytes, longer than the limit of {line.limit} bytes; it was skipped "
            "unread (split the document, or raise the limit: data.max_line_bytes in training, --max-line-bytes "
            "for the commands)")


def _row_value(row: Mapping, *, path: str, line: int) -> dict[str, Any]:
    """A Parquet row as the record a JSON Lines line would hold (`segments`, not `text`)."""
    value = dict(row)
    raw_id = value.get("id")
    doc_id = str(raw_id) if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else None
    if "id" in value and raw_id is None:
        raise RecordError(path, line, "`id` is null; in a file with an `id` column every row needs one")
    if "mode" in value and value["mode"] is None:
        del value["mode"]  # no mode given: the default mode
    if "text" in value:
        text = value.pop("text")
        if text is None or text == "":
            raise RecordError(path, line, f"`text` is {'null' if text is None else 'empty'}", doc_id)
        if not isinstance(text, str):
            raise RecordError(path, line, f"`text` must be a string, got {type(text).__name__}", doc_id)
        value["segments"] = [{"kind": "text", "text": text}]
    elif value["segments"] is None:
        raise RecordError(path, line, "`segments` is null", doc_id)
    elif isinstance(value["segments"], str):  # the JSON text of the list
        try:
            value["segments"] = load_record(value["segments"].encode("utf-8"), path=path, line=line)
        except RecordError as e:
            raise RecordError(path, line, f"`segments`: {e.reason}", doc_id) from None
    return value


# -- streaming ------------------------------------------------------------------------------


def read_records(
    path: str | StoragePath, *, metadata: bool = False, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[tuple[int, Any] | RecordError]:
    """The records of one file in order: `(number, JSON value)`, or the `RecordError` of a bad one.

    Blank lines and empty records are left out. A Parquet file is read one row group at a
    time; `metadata` reads all its columns, not only those of a document. A JSON Lines
    line longer than `max_line_bytes` is a bad record, skipped unread; one that does not
    end is the file's last (`metatrain.io.compression.iter_lines`). A remote file is
    streamed from its bucket.

    Raises:
        RecordError: the file cannot be opened (line 0).
        UserError: the file is not valid Parquet or ArrayRecord, or is damaged (a
            compressed JSON Lines file included).
    """
    path = as_path(path)
    name = str(path)
    kind = format_of(path)
    try:
        if kind == PARQUET:
            raws = _parquet_rows(path, metadata)
        elif kind == ARRAY_RECORD:
            raws = _array_record_records(path)
        else:
            raws = _jsonl_lines(path, max_line_bytes)
    except OSError as e:
        raise RecordError(name, 0, f"cannot open: {os_reason(e)}") from None
    for number, raw in raws:
        try:
            value = load_record(raw, path=name, line=number)
        except RecordError as e:
            yield e
            continue
        if value is not None:
            yield number, value


def _jsonl_lines(path: StoragePath, max_line_bytes: int) -> Iterator[tuple[int, bytes | LineTooLong]]:
    lines = iter_lines(path, max_line_bytes=max_line_bytes)
    first = next(lines, None)  # opens the file now, so an OSError is raised here
    return enumerate(() if first is None else itertools.chain([first], lines), start=1)


def _parquet_rows(path: StoragePath, metadata: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    parquet = _open_parquet(path)
    columns = _parquet_columns(parquet, path, metadata)

    def rows():
        with parquet:
            groups = (_read_row_group(parquet, path, g, columns) for g in range(parquet.metadata.num_row_groups))
            yield from enumerate(itertools.chain.from_iterable(t.to_pylist() for t in groups), start=1)

    return rows()


def _array_record_records(path: StoragePath) -> Iterator[tuple[int, bytes]]:
    reader = _open_array_record(path, random_access=False)

    def records():
        try:
            n = reader.num_records()
            for start in range(0, n, _READ_BATCH):
                batch = _read_array_record(reader, path, start, min(n, start + _READ_BATCH))
                yield from enumerate(batch, start=start + 1)
        finally:
            reader.close()

    return records()


# -- Parquet --------------------------------------------------------------------------------


def _open_parquet(path: StoragePath):
    """A `pyarrow.parquet.ParquetFile` (its footer read, no data); a remote file is opened
    through its bucket's fsspec file system, and closed with the `ParquetFile`.

    Raises:
        OSError: the file cannot be opened.
        UserError: it is not a Parquet file.
    """
    import pyarrow
    import pyarrow.parquet as pq

    source, filesystem = str(path), None
    if is_remote(source):
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, source = fsspec.core.url_to_fs(source)
        filesystem = PyFileSystem(FSSpecHandler(fs))
    try:
        return pq.ParquetFile(source, filesystem=filesystem)
    except OSError:
        raise
    except pyarrow.ArrowException as e:
        raise UserError(f"{path} is not a valid Parquet file ({e}); write it with a Parquet writer "
                        "(e.g. pyarrow.parquet.write_table), or name a JSON Lines file .jsonl") from None


def _parquet_columns(parquet, path: StoragePath, metadata: bool) -> list[str]:
    """The columns to read: those of a document, or with `metadata` all of them."""
    names = parquet.schema_arrow.names
    if ("text" in names) == ("segments" in names):
        which = "both" if "text" in names else "neither"
        raise UserError(f"{path}: a Parquet corpus has a `text` column (text-only documents) or a `segments` "
                        f"column (metatrain documents); this file has {which} (columns: {', '.join(names)})")
    return list(names) if metadata else [c for c in _DOCUMENT_COLUMNS if c in names]


def _read_row_group(parquet, path: Path | str, group: int, columns: list[str]):
    import pyarrow

    try:
        return parquet.read_row_group(group, columns=columns)
    except (OSError, pyarrow.ArrowException) as e:
        raise UserError(f"{path}: cannot read row group {group + 1} ({e}); the file is damaged, or changed "
                        "after it was indexed") from None


class ParquetRows:
    """Random access to the rows of Parquet files, indexed from their metadata.

    `rows[i]` is `(path, row number, row)`: the row a dict of the columns a document
    needs (all columns with `metadata`), for `load_record`. The index is built from each
    file's footer (rows per row group), reading no data. A row is served by decoding
    its row group, those columns only (`ParquetFile.read_row_group`); each process keeps
    the last `_CACHED_ROW_GROUPS` decoded, so reading in order decodes each row group
    once, and reading in random order (a shuffled epoch) decodes one per row.

    Raises:
        UserError: a file cannot be opened, is not Parquet, or has neither (or both) of
            the `text` and `segments` columns.
    """

    def __init__(self, files: list[StoragePath], *, metadata: bool = False):
        self.files = [str(f) for f in files]
        self._columns: list[list[str]] = []
        groups: list[tuple[int, int, int, int]] = []  # (file, row group in it, its first row there, rows)
        for k, path in enumerate(map(as_path, files)):
            try:
                parquet = _open_parquet(path)
            except OSError as e:
                raise UserError(f"data source {path}: cannot open: {os_reason(e)}") from None
            with parquet:
                self._columns.append(_parquet_columns(parquet, path, metadata))
                first = 0
                for g in range(parquet.metadata.num_row_groups):
                    rows = parquet.metadata.row_group(g).num_rows
                    groups.append((k, g, first, rows))
                    first += rows
        table = np.asarray(groups, np.int64).reshape(-1, 4)
        self._group_file, self._group_index, self._group_first = table[:, 0], table[:, 1], table[:, 2]
        self._starts = np.concatenate([[0], np.cumsum(table[:, 3])]).astype(np.int64)  # first row of each, overall
        self._decoded: collections.OrderedDict | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> tuple[str, int, dict[str, Any]]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        group = int(np.searchsorted(self._starts, index, side="right")) - 1
        offset = index - int(self._starts[group])
        row = self._row_group(group).slice(offset, 1).to_pylist()[0]
        return self.files[int(self._group_file[group])], int(self._group_first[group]) + offset + 1, row

    def _row_group(self, group: int):
        if self._decoded is None:
            self._decoded = collections.OrderedDict()
        table = self._decoded.get(group)
        if table is not None:
            self._decoded.move_to_end(group)
            return table
        k = int(self._group_file[group])
        path = self.files[k]
        with _open_parquet(as_path(path)) as parquet:  # opened per row group: no file handle to carry
            table = _read_row_group(parquet, path, int(self._group_index[group]), self._columns[k])
        self._decoded[group] = table
        if len(self._decoded) > _CACHED_ROW_GROUPS:
            self._decoded.popitem(last=False)
        return table

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_decoded"] = None  # each process decodes its own row groups
        return state

    def __repr__(self) -> str:
        return f"ParquetRows({len(self.files)} files, {len(self._group_file)} row groups, {len(self)} rows)"


# -- ArrayRecord ----------------------------------------------------------------------------


def _open_array_record(path: StoragePath, *, random_access: bool):
    """An `ArrayRecordReader` of `path` (no read-ahead for random access); array_record
    reads a `gs://` path itself.

    Raises:
        OSError: the file cannot be opened.
        UserError: it is not an ArrayRecord file.
    """
    from array_record.python.array_record_module import ArrayRecordReader

    with as_path(path).open("rb"):  # the reader reports no OS error of its own
        pass
    reader = ArrayRecordReader(str(path), "readahead_buffer_size:0,max_parallelism:0" if random_access else "")
    if not reader.ok():  # (and cannot be closed)
        raise UserError(f"{path} is not a valid ArrayRecord file; write it with array_record's "
                        "ArrayRecordWriter, or name a JSON Lines file .jsonl")
    return reader


def _read_array_record(reader, path: Path | str, start: int, end: int) -> list[bytes]:
    try:
        return reader.read(start, end)
    except RuntimeError as e:
        raise UserError(f"{path}, records {start + 1}-{end}: cannot read them ({e}); the file is damaged") from None


class ArrayRecords:
    """Random access to the records of ArrayRecord files: `records[i]` is `(path, record number, bytes)`.

    Opening the files counts their records; each process opens its own readers.

    Raises:
        UserError: a file cannot be opened or is not ArrayRecord.
    """

    def __init__(self, files: list[StoragePath]):
        self.files = [str(f) for f in files]
        counts = []
        for path in map(as_path, files):
            try:
                reader = _open_array_record(path, random_access=True)
            except OSError as e:
                raise UserError(f"data source {path}: cannot open: {os_reason(e)}") from None
            counts.append(reader.num_records())
            reader.close()
        self._bounds = np.cumsum([0, *counts], dtype=np.int64)
        self._readers: dict[int, Any] | None = None

    def __len__(self) -> int:
        return int(self._bounds[-1])

    def __getitem__(self, index: int) -> tuple[str, int, bytes]:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        k = int(np.searchsorted(self._bounds, index, side="right")) - 1
        if self._readers is None:
            self._readers = {}
        reader = self._readers.get(k)
        if reader is None:
            reader = self._readers[k] = _open_array_record(as_path(self.files[k]), random_access=True)
        position = index - int(self._bounds[k])
        return self.files[k], position + 1, _read_array_record(reader, self.files[k], position, position + 1)[0]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_readers"] = None  # readers do not pickle; reopened in each process
        return state

    def __repr__(self) -> str:
        return f"ArrayRecords({len(self.files)} files, {len(self)} records)"
