"""Writing a command's output without destroying anything on the way.

Every file metatrain writes goes through here, so three rules hold everywhere:

- **An output is never one of the command's inputs.** `encode --input a.jsonl --output
  a.jsonl` (or through a hard link, or a symlink to it) is refused before anything is
  read: the same file (device and inode) cannot be both.
- **Only regular files are replaced.** An existing output that is a symlink, a device
  (`/dev/null`), a FIFO, a socket or a directory is refused, not replaced by a file; a
  symlink is not followed, so a link planted at the output path cannot redirect a write.
- **Writes are atomic.** The new contents go to a fresh temporary file next to the target
  (same directory, so the same filesystem), are flushed to disk, and are renamed over the
  target: readers see the old file or the new one, never half, and a failure or an
  interrupt leaves the old file untouched. A replaced file keeps its permission bits.

Directory outputs (a token cache, a resized work directory) are built the same way:
`staging_dir` makes a fresh temporary directory beside the target and `publish_dir`
renames it into place, refusing a target that exists and is not an empty directory.

**Object storage** (`gs://`, see `metatrain.io.storage`) has no rename, no symlinks and no
devices, and replaces an object atomically: a file output is streamed into one upload
that is committed only on a clean exit (an error cancels it, and the old object stays).
A directory output is built in place, since a prefix cannot be renamed; its writer
writes the file that marks it complete (a cache's `cache.json`, an export's
`config.json`) last, and `discard_dir` removes what a failed build left.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from metatrain.errors import FaultError, UserError, critical_section, describe_cause
from metatrain.io.storage import StoragePath, as_path, is_remote, remove_tree

PathLike = str | os.PathLike[str]

_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISREG, "a regular file"),
)


def _fix(option: str, prefix: str = "") -> str:
    """What to do: another value for a flag, or moving a file metatrain owns out of the way."""
    return f"{prefix}choose another {option}" if option.startswith("--") else "move it out of the way"


def describe_kind(mode: int) -> str:
    """What kind of file `mode` (`os.stat().st_mode`) is, for a message: "a named pipe (FIFO)", ..."""
    return next((name for test, name in _KINDS if test(mode)), "an unknown kind of file")


def check_output_file(path: PathLike, *, inputs: Iterable[PathLike] = (), option: str = "--output") -> Path:
    """`path` as a `Path`, once it is safe to replace: refused (UserError) when it exists
    and is not a regular file, or when it is the same file as one of `inputs`.

    `option` names the flag in the message (`--output`, `--out`).
    """
    if is_remote(path):
        return _check_remote_output_file(as_path(path), inputs, option)
    path = Path(path)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return path
    except OSError as e:
        raise UserError(f"{option} {path}: cannot check it: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(
            f"{option} {path} is {describe_kind(info.st_mode)}; metatrain only replaces regular files: "
            f"{_fix(option)}"
        )
    for source in inputs:
        try:
            other = os.stat(source)
        except OSError:
            continue  # an input that does not exist is reported by whoever reads it
        if (other.st_dev, other.st_ino) == (info.st_dev, info.st_ino):
            same = "" if Path(source) == path else f" (the input {source})"
            raise UserError(
                f"{option} {path} is one of the inputs{same}; writing it would destroy what "
                f"is being read: choose another {option}"
            )
    return path


def _check_remote_output_file(path: StoragePath, inputs: Iterable[PathLike], option: str) -> StoragePath:
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory (objects exist under it); metatrain only "
                        f"replaces files: {_fix(option)}")
    for source in inputs:
        if str(source).rstrip("/") == str(path):
            raise UserError(f"{option} {path} is one of the inputs; writing it would destroy what is "
                            f"being read: choose another {option}")
    return path


class _RemoteUpload:
    """One object written as a stream: committed on `commit()`, cancelled by `cancel()`."""

    def __init__(self, path: StoragePath, binary: bool):
        import io

        self.raw = path.open("wb")
        self.handle = self.raw if binary else io.TextIOWrapper(self.raw, encoding="utf-8", newline="")

    def commit(self) -> None:
        self.handle.flush()
        self.raw.close()

    def cancel(self) -> None:
        """Abandon the upload: nothing reaches the bucket, and the old object stays. gcsfs
        only starts an upload once a block is buffered, and a file left open would upload
        its buffer when collected, so the buffer is dropped and the file marked closed."""
        import io

        if self.handle is not self.raw:
            self.handle.detach()  # the text layer must not flush into the file later
        discard = getattr(self.raw, "discard", None)  # gcsfs: abandon a resumable upload begun
        if discard is not None:
            discard()
        self.raw.buffer = io.BytesIO()
        self.raw.closed = True


class atomic_output:  # noqa: N801 - used like `open`
    """`with atomic_output(path) as handle:` writes a temporary file beside `path`; on a
    clean exit it replaces `path`, on an exception it is removed and `path` is untouched.

    Checks `path` with `check_output_file` first. (A class, not a generator-based context
    manager: exceptions that are frozen dataclasses, like `RecordError`, must pass through
    unchanged.)
    """

    def __init__(self, path: PathLike, *, inputs: Iterable[PathLike] = (), option: str = "--output",
                 binary: bool = False):
        self.path = check_output_file(path, inputs=inputs, option=option)
        self.inputs, self.option, self.binary = list(inputs), option, binary

    def __enter__(self) -> IO:
        if is_remote(str(self.path)):
            self.upload = _RemoteUpload(self.path, self.binary)
            return self.upload.handle
        self.upload = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent)
        self.tmp = Path(tmp_name)
        self.handle = os.fdopen(fd, "wb" if self.binary else "w", **({} if self.binary else {"encoding": "utf-8"}))
        return self.handle

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.upload is not None:
            if exc_type is None:
                self.upload.commit()
            else:
                self.upload.cancel()
            return
        try:
            if exc_type is None:
                self.handle.flush()
                os.fsync(self.handle.fileno())
            self.handle.close()
            if exc_type is None:
                _publish_file(self.tmp, self.path, inputs=self.inputs, option=self.option)
        finally:
            self.tmp.unlink(missing_ok=True)


def write_atomically(
    path: PathLike,
    data: bytes | str | Callable[[Path], None],
    *,
    inputs: Iterable[PathLike] = (),
    option: str = "--output",
) -> Path:
    """Replace `path` with `data` (bytes, text, or a function that writes a given path)
    atomically, after the checks of `check_output_file`. Returns `path`."""
    path = check_output_file(path, inputs=inputs, option=option)
    if callable(data) and is_remote(str(path)):
        with tempfile.TemporaryDirectory(prefix="metatrain-upload-") as local:
            tmp = Path(local) / path.name
            data(tmp)  # the writer needs a local file (a library's `save(path)`); uploaded whole
            with atomic_output(path, inputs=inputs, option=option, binary=True) as handle, open(tmp, "rb") as src:
                shutil.copyfileobj(src, handle, 1 << 22)
        return path
    if callable(data):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            data(tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            _publish_file(tmp, path, inputs=inputs, option=option)
        finally:
            tmp.unlink(missing_ok=True)
        return path
    with atomic_output(path, inputs=inputs, option=option, binary=isinstance(data, bytes)) as handle:
        handle.write(data)
    return path


def _publish_file(tmp: Path, path: Path, *, inputs: Iterable[PathLike], option: str) -> None:
    """Rename `tmp` over `path`, re-checking `path` (it may have changed while we wrote)."""
    check_output_file(path, inputs=inputs, option=option)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable; some filesystems (and platforms) cannot open directories."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_dir(path: PathLike, *, option: str = "--out") -> Path:
    """`path` as a `Path`, refused (UserError) unless it is absent or an empty directory
    (not a symlink to one: a link is never followed or replaced)."""
    if is_remote(path):
        path = as_path(path)
        if path.is_file():
            raise UserError(f"{option} {path} already exists and is a file, not a directory to create: "
                            f"choose another {option}")
        if path.is_dir() and any(path.iterdir()):
            raise UserError(f"{option} {path} already exists and is not empty; metatrain never writes "
                            f"into a directory with contents: {_fix(option, 'remove it or ')}")
        return path
    path = Path(path)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return path
    if not stat.S_ISDIR(info.st_mode):
        raise UserError(f"{option} {path} already exists and is {describe_kind(info.st_mode)}, not a "
                        f"directory to create: choose another {option}")
    if any(path.iterdir()):
        raise UserError(f"{option} {path} already exists and is not empty; metatrain never "
                        f"writes into a directory with contents: {_fix(option, 'remove it or ')}")
    return path


def staging_dir(path: PathLike, *, option: str = "--out") -> Path:
    """A fresh, empty temporary directory beside `path`, to build it in and `publish_dir`.
    In object storage: `path` itself, once it is checked to be absent or empty."""
    path = check_output_dir(path, option=option)
    if is_remote(str(path)):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))


def publish_dir(staging: Path, path: PathLike, *, option: str = "--out") -> Path:
    """Rename the built `staging` directory to `path` (absent or empty); removes `staging`
    when `path` was taken meanwhile. In object storage the directory was built in place."""
    if is_remote(path):
        return as_path(path)
    path = Path(path)
    try:
        check_output_dir(path, option=option)
        if path.exists():
            path.rmdir()
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.chmod(path, 0o777 & ~_umask())
    _fsync_directory(path.parent)
    return path


class built_dir:  # noqa: N801 - used like `open`
    """`with built_dir(path, what="the export") as staging:` builds a directory output in
    `staging_dir(path)`: a clean exit publishes it (`publish_dir`); an exception or an
    interrupt removes it, and an `OSError` becomes a `FaultError` naming `what` and `path`.
    (A class, for the reason `atomic_output` is one.)"""

    def __init__(self, path: PathLike, *, what: str, option: str = "--out"):
        self.path, self.what, self.option = path, what, option

    def __enter__(self) -> Path:
        # An interrupt waits until `self.staging` names the directory just made; raised
        # here (where `__exit__` is not called), it removes the directory itself.
        self.staging = None
        try:
            with critical_section():
                self.staging = staging_dir(self.path, option=self.option)
        except BaseException:
            if self.staging is not None:
                discard_dir(self.staging)
            raise
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            publish_dir(self.staging, self.path, option=self.option)
            return
        discard_dir(self.staging)
        if isinstance(exc, OSError):
            raise FaultError(f"writing {self.what} {self.path} failed: {describe_cause(exc)}") from None


#: How long `discard_dir` keeps removing a staging directory that writes still land in.
DISCARD_GRACE_S: float = 5.0
#: How long a discarded staging directory must stay gone before `discard_dir` returns.
DISCARD_SETTLE_S: float = 0.2


def discard_dir(staging: PathLike) -> None:
    """Remove a directory `staging_dir` gave, after its build failed. An interrupt can
    land while a library's own threads still write into it (tensorstore finishes a
    write whose `.result()` was interrupted, creating its folders again), so the tree is
    removed again until it has stayed gone for `DISCARD_SETTLE_S` (at most
    `DISCARD_GRACE_S` in all)."""
    remove_tree(staging)
    if is_remote(str(staging)):
        return
    deadline = gone_since = time.monotonic()
    deadline += DISCARD_GRACE_S
    while time.monotonic() < deadline and time.monotonic() - gone_since < DISCARD_SETTLE_S:
        time.sleep(0.02)
        if os.path.lexists(staging):
            remove_tree(staging)
            gone_since = time.monotonic()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
