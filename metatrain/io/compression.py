"""Compressed JSON Lines: reading `.jsonl.gz`, `.jsonl.zst`, `.jsonl.bz2` and `.jsonl.xz`.

A file's name says how it is compressed (`COMPRESSIONS`); a compressed file under a
plain name is refused in one line that says what it is and how to name it, instead of
being read as text (a gzip file would otherwise read as "invalid UTF-8 at byte 1").

Two ways in, one per read path:

- `iter_lines(path)` streams the raw lines of a file, decompressing as it goes, in
  bounded memory (`metatrain.documents.read_documents`: `encode`, `tokenizer train`): a
  line longer than `MAX_LINE_BYTES` (or the bound given) is skipped to its end in chunks,
  never held, and comes as a `LineTooLong` for the reader to count as a bad record; a
  file that has no line end for `SKIP_FACTOR` more bounds (`/dev/zero`, a binary file)
  is abandoned there.
- `random_access_path(path)` gives a plain file that `metatrain.data.sources.JsonlLines`
  can index and read by byte range (grain reads record i by its byte offset). A plain
  file is returned as it is (a remote one too: it is read in place, by ranged requests). A compressed file is decompressed once, streaming, into a *spill
  file* in a private directory under the system temp directory (`$TMPDIR`), which the
  process that made it removes when it exits. The spill is chosen over keeping the
  decompressed bytes in memory because `JsonlLines` is pickled into every grain worker
  process: a path and the small offset arrays travel, the corpus does not, and the
  workers share the page cache of one file. It costs free disk space of the
  decompressed size under `$TMPDIR` (point `TMPDIR` at a local disk, not a RAM-backed
  /tmp, for big corpora), and each host of a multi-host run decompresses its own copy
  once (each indexes every source itself). A spill is reused for as long as the process
  lives and the compressed file is unchanged. For a big compressed corpus read again
  and again, `metatrain data cache` (which reads its inputs once, in order) is cheaper.

Both accept a file in object storage (`gs://`, see `metatrain.io.storage`): its bytes are
read as a stream from the bucket, and a compressed one is decompressed as it arrives,
into the same local spill file as a local one (only the decompressed copy is local;
nothing is downloaded first).

Seekable-index formats (zran-style gzip indexes, seekable zstd) are not used: they would
need writers we do not control.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import io
import lzma
import os
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from metatrain.errors import UserError, fault_from_os_error
from metatrain.io.spill import spill_directory
from metatrain.io.storage import StoragePath, as_path, file_size, is_remote

#: File-name suffix -> compression format read transparently.
COMPRESSIONS: dict[str, str] = {".gz": "gzip", ".zst": "zstd", ".bz2": "bzip2", ".xz": "xz"}

#: Leading bytes of each format, for naming a compressed file that has a plain name.
_MAGIC: tuple[tuple[bytes, str, str], ...] = (
    (b"\x1f\x8b", "gzip", ".gz"),
    (b"\x28\xb5\x2f\xfd", "zstd", ".zst"),
    (b"BZh", "bzip2", ".bz2"),
    (b"\xfd7zXZ\x00", "xz", ".xz"),
)
_ZSTD_MAX_WINDOW = 1 << 31  # accepts files written with `zstd --long=31`
_COPY_CHUNK = 1 << 20
_READ_CHUNK = 1 << 20  # bytes read at a time when splitting lines

#: The longest JSON Lines line read, in bytes (its newline not counted), unless a setting
#: says otherwise (`data.max_line_bytes`, `--max-line-bytes`): a longer line is a bad
#: record, refused without being held, so a corpus of one 200 MB line or `/dev/zero`
#: cannot exhaust memory.
MAX_LINE_BYTES = 64 << 20
#: How far past the bound an over-long line is followed to its end, in bounds: a line
#: with no end within `SKIP_FACTOR` more bounds means the file is not JSON Lines (a
#: device, a binary file), and the rest of it is not read.
SKIP_FACTOR = 16


@dataclasses.dataclass(frozen=True)
class LineTooLong:
    """A line longer than the bound, in place of its bytes (`iter_lines`,
    `metatrain.data.sources.JsonlLines`); `metatrain.io.formats.load_record` makes it a
    record error.

    Attributes:
        length: the line's length in bytes (its newline not counted); when it has not
            `ended`, the bytes of it in which no line end was found.
        limit: the bound it is past.
        ended: whether its end was found; if not, the rest of its file is not read.
    """

    length: int
    limit: int
    ended: bool


def compression_of(path: str | Path) -> str | None:
    """The compression a file's name declares ("gzip", "zstd", ...), or None for a plain file."""
    return COMPRESSIONS.get(Path(path).suffix.lower())


def sniff_compression(head: bytes) -> tuple[str, str] | None:
    """`(format, suffix)` when `head` (a file's first bytes) starts like a compressed file."""
    for magic, name, suffix in _MAGIC:
        if head.startswith(magic) and (name != "bzip2" or head[3:4].isdigit()):
            return name, suffix
    return None


def _check_plain(path: StoragePath, head: bytes) -> None:
    found = sniff_compression(head)
    if found is not None:
        name, suffix = found
        raise UserError(
            f"{path} is {name}-compressed; name it {path}{suffix} so metatrain decompresses it "
            f"(or decompress it)"
        )


def _open_decompressed(path: StoragePath, compression: str) -> BinaryIO:
    """A binary stream of the decompressed bytes of `path` (a remote file is streamed
    from its bucket); closing it closes the file."""
    raw = path.open("rb")
    if compression == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).stream_reader(
            raw, read_across_frames=True, closefd=True
        )
        return io.BufferedReader(reader, _COPY_CHUNK)
    opener = {"gzip": gzip.GzipFile, "bzip2": bz2.BZ2File, "xz": lzma.LZMAFile}[compression]
    return _ClosingReader(opener(fileobj=raw) if compression == "gzip" else opener(raw), raw)


class _ClosingReader(io.BufferedReader):
    """A decompressing stream that also closes the file under it (the decompressors
    given a file object leave it open)."""

    def __init__(self, stream: BinaryIO, raw: BinaryIO):
        super().__init__(stream, _COPY_CHUNK)
        self._file = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._file.close()


def _decompression_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    # gzip: BadGzipFile (an OSError) or zlib.error; truncated files: EOFError;
    # bzip2: OSError("Invalid data stream"); xz: LZMAError.
    return (EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError, gzip.BadGzipFile)


def _corrupt(path: StoragePath, compression: str, error: BaseException) -> UserError:
    return UserError(f"{path}: cannot decompress it as {compression} ({error}); the file is damaged "
                     "or not compressed the way its name says")


def iter_lines(path: str | StoragePath, *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[bytes | LineTooLong]:
    """The raw lines of a JSON Lines file (with their newline), decompressed if its name says so.

    A line longer than `max_line_bytes` (its newline not counted) comes as a
    `LineTooLong` in its place, and is skipped to its end without being held; a line
    with no end within `SKIP_FACTOR` more bounds is the last item: the rest of the
    file is not read. The file is read in chunks, so memory stays within about twice
    `max_line_bytes` (a line and its copy as it grows), whatever the file holds. A
    remote file (`gs://...`) is streamed from its bucket.

    Raises:
        OSError: the file cannot be opened.
        UserError: a plain-named file is compressed; a compressed file is damaged
            (raised where the damage is met, after the lines before it).
    """
    path = as_path(path)
    compression = compression_of(path)
    if compression is None:
        with path.open("rb") as handle:
            head = handle.read(_READ_CHUNK)
            _check_plain(path, head[:8])
            yield from _split_lines(handle.read, max_line_bytes, head)
        return
    with _open_decompressed(path, compression) as handle:
        yield from _split_lines(lambda n: _guarded(lambda: handle.read(n), path, compression), max_line_bytes)


def _split_lines(read: Callable[[int], bytes], limit: int, buffer: bytes = b"") -> Iterator[bytes | LineTooLong]:
    """The lines of the stream `read(n)` gives, each at most `limit` bytes (its newline
    not counted), the others as `LineTooLong`; `buffer` holds bytes already read.

    The buffer holds a partial line and one read: reads grow with the partial line (so
    a long line is not copied over and over) and stop once it passes `limit`.
    """
    start = scanned = 0  # the current line starts at `start`; buffer[start:scanned] holds no newline
    at_end = False
    while True:
        end = buffer.find(b"\n", scanned, start + limit + 1)
        if end >= 0:
            yield buffer[start:end + 1]
            start = scanned = end + 1
            continue
        pending = len(buffer) - start
        if pending > limit:
            too_long, buffer = _skip_line(read, buffer[start + limit + 1:], limit)
            yield too_long
            if not too_long.ended:
                return
            start = scanned = 0
            continue
        if at_end:
            if pending:
                yield buffer[start:]
            return
        chunk = read(max(_READ_CHUNK, min(pending, limit + 1 - pending)))
        if not chunk:
            at_end = True
            continue
        buffer, scanned, start = buffer[start:] + chunk, pending, 0


def _skip_line(read: Callable[[int], bytes], rest: bytes, limit: int) -> tuple[LineTooLong, bytes]:
    """Follows a line whose first `limit + 1` bytes were read to its end, holding one
    read at a time; `rest` are the bytes read after those. Gives up (the line has not
    `ended`) past `SKIP_FACTOR` more bounds. Returns the line, and the bytes read after it.
    """
    length = limit + 1
    while True:
        end = rest.find(b"\n")
        if end >= 0:
            return LineTooLong(length + end, limit, ended=True), rest[end + 1:]
        length += len(rest)
        if length >= (SKIP_FACTOR + 1) * limit:  # (the last read may have gone past it)
            return LineTooLong((SKIP_FACTOR + 1) * limit, limit, ended=False), b""
        rest = read(_READ_CHUNK)
        if not rest:  # the end of the file ends the line
            return LineTooLong(length, limit, ended=True), b""


_spills: dict[tuple[str, int, int], Path] = {}


def random_access_path(path: str | StoragePath) -> StoragePath:
    """A plain file with the decompressed bytes of `path`: `path` itself when it is not compressed.

    A remote compressed file is streamed from its bucket into a local spill file; a
    remote plain file is returned as it is (read in place).

    Raises:
        OSError: the file cannot be opened.
        UserError: a plain-named file is compressed; a compressed file is damaged.
        FaultError: the spill file cannot be written (e.g. `$TMPDIR` is full).
    """
    path = as_path(path)
    compression = compression_of(path)
    if compression is None:
        with path.open("rb") as handle:
            _check_plain(path, handle.read(8))
        return path
    key = _signature(path)
    spill = _spills.get(key)
    if spill is not None and spill.exists():
        return spill
    source = _open_decompressed(path, compression)  # an OSError here: the input cannot be opened
    directory = spill_directory()
    fd, name = tempfile.mkstemp(dir=directory, prefix=path.name + ".", suffix=".jsonl")
    spill = Path(name)
    try:
        with source, os.fdopen(fd, "wb") as out:
            _copy(source, out, path, compression)
    except OSError as e:
        spill.unlink(missing_ok=True)
        raise fault_from_os_error(e, f"decompressing {path} into {directory} (set TMPDIR to a disk "
                                     "with room for the decompressed corpus)") from None
    except BaseException:
        spill.unlink(missing_ok=True)
        raise
    _spills[key] = spill
    return spill


def _signature(path: StoragePath) -> tuple[str, int, int]:
    """What identifies a file's contents for reusing its spill: name, size, modification time."""
    if is_remote(str(path)):
        return str(path), file_size(path), int(path.stat().mtime)
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _copy(source: BinaryIO, out: BinaryIO, path: StoragePath, compression: str) -> None:
    while chunk := _guarded(lambda: source.read(_COPY_CHUNK), path, compression):
        out.write(chunk)


def _guarded(read, path: StoragePath, compression: str) -> bytes:
    """`read()`, with a decompression failure turned into a `UserError` naming the file."""
    try:
        return read()
    except _decompression_errors() as e:
        raise _corrupt(path, compression, e) from None
    except OSError as e:
        if e.errno is not None:  # a real I/O error; bz2 says "Invalid data stream" without one
            raise
        raise _corrupt(path, compression, e) from None
