"""Compressed JSON Lines: reading `.jsonl.gz`, `.jsonl.zst`, `.jsonl.bz2` and `.jsonl.xz`.

A file's name says how it is compressed (`COMPRESSIONS`); a compressed file under a
plain name is refused in one line that says what it is and how to name it, instead of
being read as text (a gzip file would otherwise read as "invalid UTF-8 at byte 1").

Two ways in, one per read path:

- `iter_lines(path)` streams the raw lines of a file, decompressing as it goes, in
  constant memory (`metatrain.documents.read_documents`: `encode`, `tokenizer train`).
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
import gzip
import io
import lzma
import os
import tempfile
import zlib
from collections.abc import Iterator
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


def iter_lines(path: str | StoragePath) -> Iterator[bytes]:
    """The raw lines of a JSON Lines file (with their newline), decompressed if its name says so.

    A remote file (`gs://...`) is streamed from its bucket.

    Raises:
        OSError: the file cannot be opened.
        UserError: a plain-named file is compressed; a compressed file is damaged
            (raised where the damage is met, after the lines before it).
    """
    path = as_path(path)
    compression = compression_of(path)
    if compression is None:
        with path.open("rb") as handle:
            first = handle.readline()
            _check_plain(path, first[:8])
            if first:
                yield first
            yield from handle
        return
    with _open_decompressed(path, compression) as handle:
        while line := _guarded(handle.readline, path, compression):
            yield line


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
