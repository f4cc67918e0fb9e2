"""Where a path lives: the local disk, or object storage (`gs://`, and `s3://` for reading).

Every path metatrain reads or writes (data sources, token caches, tokenizers, the work
directory and its checkpoints, sweep and export directories) may name a bucket. Local
paths stay `pathlib.Path`, with everything the local filesystem gives (flock, atomic
renames, permission bits); a remote path is an `etils.epath.Path`, which reads and
writes through fsspec (`gcsfs` for `gs://`, `s3fs` for `s3://` when installed). Arrays
go through tensorstore and orbax, which speak GCS themselves. Nothing is copied to local
disk first.

`pathlib.Path("gs://b/x")` would silently become the local relative path `gs:/b/x`, so
code that may meet a remote path builds it with `as_path`, never with `Path`.

Object storage has no rename and no append. What metatrain writes there is written as
whole objects (GCS replaces an object atomically: a reader sees the old one or the new
one), and what is published as a directory (a token cache, an export) has a marker file
that is written last.

**Emulators.** `STORAGE_EMULATOR_HOST=http://HOST:PORT`, the variable Google's client
libraries honour, points every `gs://` access at an emulator: `configure_emulator`
(run by `configure_storage` when metatrain is imported) passes it on to the libraries that read other
variables: tensorstore (`TENSORSTORE_GCS_HTTP_URL`, with a placeholder token, since an
emulator needs none), array_record's C++ client (`CLOUD_STORAGE_EMULATOR_ENDPOINT`) and
gcsfs (anonymous access, no metadata-server probe).

A few reads are spelt differently by `pathlib` and `epath`, or done well only by fsspec:
`glob_paths` (Python's `glob` cannot list a bucket, and `epath` refuses `**`),
`read_range` (one ranged request, without the read-ahead block a buffered handle would
fetch for each random read), `file_size`, and `os_reason` (gcsfs raises `OSError`s with
no `strerror` and the request path as message, which would read as a file name).

**Malformed URLs** are refused by `as_path` (and `split_bucket`) before any request, in
one line (`check_url`): no bucket (`gs://`, `gs:///x`, which epath would read as bucket
`x`), a bucket name Cloud Storage's naming rules refuse (which gcsfs would retry for a
minute and google-cloud-storage would raise as a bare ValueError), `.` or `..` parts
(object names are not resolved, and some libraries collapse them while others do not),
control characters, and object names over 1,024 bytes.
"""

from __future__ import annotations

import errno
import functools
import glob as _glob
import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Any, Union

from metatrain.errors import UserError

#: URL schemes of object storage. `gs` is read and written; `s3` is read where the
#: libraries support it (`pip install s3fs`).
REMOTE_SCHEMES: tuple[str, ...] = ("gs", "s3")
EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")

#: A local `pathlib.Path` or a remote `etils.epath.Path`; both have `/`, `name`, `open`,
#: `exists`, `is_file`, `is_dir`, `iterdir`, `glob`, `mkdir`, `read_*` and `write_*`.
StoragePath = Union[Path, Any]


def scheme_of(path: str | os.PathLike) -> str | None:
    """`"gs"` for `gs://b/x`; None for a local path."""
    match = _SCHEME.match(str(path) if not isinstance(path, Path) else "")
    return match.group(1).lower() if match else None


def is_remote(path: str | os.PathLike | None) -> bool:
    """Whether `path` names object storage (`gs://...`, `s3://...`)."""
    if path is None or isinstance(path, Path):
        return False
    return scheme_of(path) is not None


def as_path(path: str | os.PathLike) -> StoragePath:
    """`path` as a local `Path`, or as an `epath.Path` when it names object storage.

    Raises:
        UserError: an unsupported scheme (`http://`, `ftp://`, a typo such as `gcs://`).
    """
    if isinstance(path, Path):
        return path
    scheme = scheme_of(path)
    if scheme is None:
        if type(path).__module__.startswith("etils"):
            return path  # already an epath.Path
        return Path(path)
    if scheme not in REMOTE_SCHEMES:
        raise UserError(f"{path}: metatrain reads and writes local paths, gs:// and s3:// (not {scheme}://); "
                        "give a local path or a bucket URL")
    check_url(str(path))
    if scheme == "gs":
        _require_gcs(str(path))
    from etils import epath

    return epath.Path(str(path))


def join(base: str | os.PathLike, *parts: str) -> StoragePath:
    """`as_path(base) / part / ...`."""
    out = as_path(base)
    for part in parts:
        out = out / part
    return out


def absolute(path: str | os.PathLike) -> StoragePath:
    """A local path resolved (symlinks and `..`), a remote one as it is.

    Raises:
        UserError: a malformed bucket URL (`check_url`), or a local path through a loop
            of symbolic links.
    """
    p = as_path(path)
    if is_remote(str(p)):
        return p
    try:
        return p.resolve()
    except RuntimeError:  # Python < 3.13's word for ELOOP
        raise UserError(f"{path} is a loop of symbolic links; fix or remove the link") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{path} is a loop of symbolic links; fix or remove the link") from None
        raise


def split_bucket(path: str | os.PathLike) -> tuple[str, str]:
    """`("b", "x/y")` for `gs://b/x/y`.

    Raises:
        UserError: a malformed URL (`check_url`), e.g. one that names no bucket.
    """
    text = str(path)
    check_url(text)
    bucket, _, name = text.split("://", 1)[1].partition("/")
    return bucket, name.strip("/")


#: Cloud Storage's bucket naming rules (cloud.google.com/storage/docs/buckets#naming).
_GCS_BUCKET_CHARACTERS = re.compile(r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$")
_GCS_BUCKET_RULES = ("bucket names have 3-63 lowercase letters, digits, '-', '_' or '.' (up to 222 "
                     "with dots, 63 between dots), start and end with a letter or digit, and do not "
                     "start with 'goog' or contain 'google'")
#: Longest object name Cloud Storage accepts, in bytes of UTF-8.
MAX_OBJECT_NAME_BYTES: int = 1024


def check_url(url: str) -> None:
    """Refuses a bucket URL that no request could serve, before any request is made.

    Raises:
        UserError: no bucket, a bucket name against Cloud Storage's rules (`gs://`), a `.`
            or `..` part, a control character, or an object name over 1,024 bytes; the
            message shows the URL with its control characters escaped.
    """
    scheme, _, rest = url.partition("://")
    bucket, _, name = rest.partition("/")
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in url)

    def refuse(problem: str) -> UserError:
        return UserError(f"{shown}: {problem}; write {scheme}://BUCKET/PATH")

    if not bucket:
        raise refuse("names no bucket")
    if scheme.lower() == "gs":
        problem = _gcs_bucket_problem(bucket)
        if problem:
            raise refuse(f"bucket name {bucket!r} {problem} ({_GCS_BUCKET_RULES})")
    control = next((c for c in rest if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F), None)
    if control is not None:
        raise refuse(f"a control character ({repr(control)[1:-1]}) is in the name; no object name holds one")
    for part in name.split("/"):
        if part in (".", ".."):
            raise refuse(f"{part!r} is not a folder in a bucket (object names are never resolved)")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_OBJECT_NAME_BYTES:
        raise refuse(f"the object name is {size:,} bytes; Cloud Storage allows at most {MAX_OBJECT_NAME_BYTES:,}")


def _gcs_bucket_problem(bucket: str) -> str | None:
    """What is wrong with GCS bucket name `bucket`, or None."""
    if not _GCS_BUCKET_CHARACTERS.match(bucket):
        if len(bucket) >= 2 and re.fullmatch(r"[a-z0-9._-]+", bucket):
            return "must start and end with a letter or digit"
        return "may hold only lowercase letters, digits, '-', '_' and '.'" if len(bucket) >= 3 else "is too short"
    components = bucket.split(".")
    if not 3 <= len(bucket) <= (222 if len(components) > 1 else 63) or max(map(len, components)) > 63:
        return f"is {len(bucket)} characters long"
    try:
        ipaddress.IPv4Address(bucket)
        return "is an IP address"
    except ValueError:
        pass
    if bucket.startswith("goog") or "google" in bucket or "g00gle" in bucket:
        return "is reserved"
    return None


def tensorstore_kvstore(path: str | os.PathLike) -> dict[str, Any]:
    """tensorstore's kvstore spec for a directory, local or in a bucket."""
    if is_remote(path):
        scheme = scheme_of(path)
        bucket, name = split_bucket(path)
        driver = {"gs": "gcs", "s3": "s3"}[scheme]
        return {"driver": driver, "bucket": bucket, "path": name + "/" if name else ""}
    return {"driver": "file", "path": str(Path(path))}


def emulator_host(environ: dict[str, str] | None = None) -> str | None:
    """The emulator `STORAGE_EMULATOR_HOST` names, as `http://HOST:PORT`, or None."""
    value = (environ if environ is not None else os.environ).get(EMULATOR_VARIABLE, "").strip()
    if not value:
        return None
    return value if "://" in value else f"http://{value}"


def configure_storage(environ: dict[str, str] | None = None) -> None:
    """Settings every process needs before its first remote access (`metatrain/__init__.py`
    runs this): epath always uses fsspec (gcsfs), even where TensorFlow is installed (the
    `seqio` extra), so a path behaves the same in every environment; and the emulator's
    variables (`configure_emulator`)."""
    env = os.environ if environ is None else environ
    env.setdefault("EPATH_USE_TF", "false")
    configure_emulator(env)


def configure_emulator(environ: dict[str, str] | None = None) -> None:
    """Point every library's `gs://` access at `STORAGE_EMULATOR_HOST`, when it is set.

    Only fills variables the user has not set. Must run before gcsfs is imported (it
    reads its settings then), which is why `metatrain/__init__.py` calls it.
    """
    env = os.environ if environ is None else environ
    host = emulator_host(env)
    if host is None:
        return
    env[EMULATOR_VARIABLE] = host
    env.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
    env.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # tensorstore needs some token
    env.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", host)  # google-cloud-cpp (array_record)
    env.setdefault("NO_GCE_CHECK", "true")  # do not probe the GCE metadata server
    env.setdefault("FSSPEC_GCS_TOKEN", "anon")
    env.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # emulators have no bucket-layout API
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)  # it logs each fallback it takes


def _require_gcs(path: str) -> None:
    """gcsfs is importable, and configured: no cached directory listings, since other
    processes (a trainer, the other hosts) write the same prefixes while this one reads
    them, and a cached listing would hide their new checkpoints and files."""
    try:
        import fsspec
        import gcsfs  # noqa: F401
    except ImportError:  # pragma: no cover - a dependency of metatrain
        raise UserError(f"{path}: reading gs:// needs gcsfs; pip install gcsfs") from None
    fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


@functools.lru_cache(maxsize=1)
def gcs_client():
    """A google-cloud-storage client (anonymous against an emulator)."""
    from google.cloud import storage

    if emulator_host() is not None:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="metatrain-emulator", credentials=AnonymousCredentials())
    return storage.Client()


def gcs_blob(path: str | os.PathLike):
    """The google-cloud-storage `Blob` of `gs://b/x`."""
    bucket, name = split_bucket(path)
    return gcs_client().bucket(bucket).blob(name)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a directory (every object under a prefix); absent is fine."""
    p = as_path(path)
    if is_remote(str(p)):
        if p.exists():
            p.rmtree()
        return
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def move_tree(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename a directory; in object storage (no rename), copy every object, then delete
    (through epath's own file system, so its cached listings stay true)."""
    if not is_remote(str(source)):
        os.replace(source, target)
        return
    as_path(str(source)).rename(as_path(str(target)))


class ObjectAppender:
    """Appends text to an object in a bucket, which has no append: lines are buffered
    and added every `flush_every_s` seconds (and on `flush()`) as one GCS compose of
    the object and a new part, atomic on the server. A file-like `write`/`flush`/`close`.

    Args:
        path: `gs://BUCKET/NAME`; created on the first flush if absent.
        flush_every_s: seconds between uploads (a crash loses at most this much).
    """

    #: Components after which the composed object is rewritten as a single one.
    COMPACT_AFTER: int = 512

    def __init__(self, path: str | os.PathLike, flush_every_s: float = 30.0):
        import time

        self.path = str(path)
        self.flush_every_s = flush_every_s
        self._pending: list[str] = []
        self._clock = time.monotonic
        self._last = self._clock()

    def write(self, text: str) -> None:
        self._pending.append(text)
        if self._clock() - self._last >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Upload what is buffered. Raises OSError when the bucket refuses it."""
        if not self._pending:
            return
        from google.api_core import exceptions as gexc

        data = "".join(self._pending).encode("utf-8")
        blob = gcs_blob(self.path)
        try:
            try:
                blob.upload_from_string(data, if_generation_match=0)
            except gexc.PreconditionFailed:  # it exists, or our own create was retried
                blob.reload()
                if not (blob.size == len(data) and blob.download_as_bytes() == data):
                    self._compose(blob, data)
        except gexc.GoogleAPICallError as e:
            raise OSError(f"{self.path}: {e.message}") from None
        self._pending.clear()
        self._last = self._clock()

    def _compose(self, blob, data: bytes) -> None:
        """Append `data` to the existing object `blob`: upload it as a part, compose, delete
        the part. Past `COMPACT_AFTER` components the object is rewritten as a single one,
        so its component count stays bounded however long the run appends."""
        import uuid

        part = gcs_blob(f"{self.path}.part-{uuid.uuid4().hex}")
        part.upload_from_string(data)
        try:
            blob.compose([blob, part])
        finally:
            part.delete()
        if (blob.component_count or 0) >= self.COMPACT_AFTER:
            blob.upload_from_string(blob.download_as_bytes(), if_generation_match=blob.generation)

    def close(self) -> None:
        self.flush()


# -- reads that pathlib and epath spell differently --------------------------------------


def glob_paths(pattern: str | os.PathLike, *, files_only: bool = False, recursive: bool = True) -> list[StoragePath]:
    """The paths `pattern` matches, sorted (as paths: by their parts); with `files_only`, only files.

    A local pattern is expanded by `glob.glob(pattern, recursive=recursive)`. A remote
    one (`gs://b/shards/*.jsonl`) is listed in the bucket, where `**` always matches any
    depth; its directories are the prefixes objects have (an empty directory does not
    exist in object storage).
    """
    text = str(pattern)
    if not is_remote(text):
        found = [as_path(p) for p in _glob.glob(text, recursive=recursive)]
        return sorted(p for p in found if not files_only or p.is_file())
    check_url(text)
    import fsspec

    fs, fs_pattern = fsspec.core.url_to_fs(text)
    scheme = text.split("://", 1)[0]
    matches = fs.glob(fs_pattern, detail=True)
    names = [name for name, info in matches.items() if not files_only or info.get("type") == "file"]
    return sorted(as_path(f"{scheme}://{name}") for name in names)


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes `[start, end)` of the remote file `url`, in one ranged request.

    fsspec keeps one file system per process (a forked worker makes its own), so this
    may be called from grain's worker processes.
    """
    import fsspec

    fs, name = fsspec.core.url_to_fs(url)
    return fs.cat_file(name, start, end)


def file_size(path: StoragePath) -> int:
    """The size in bytes of a local or remote file."""
    info = path.stat()
    return info.st_size if hasattr(info, "st_size") else info.length


def os_reason(error: OSError) -> str:
    """Why a read failed, in words: the `strerror` of a local error; for a remote one
    that has none (gcsfs), "No such file or directory" or the error's own text."""
    if error.strerror:
        return error.strerror
    if isinstance(error, FileNotFoundError):
        return "No such file or directory"
    return str(error)
