"""The files of an annotation run, and resuming into them.

Files (`OUT` is `--out`):

- `OUT`: one annotated document per line, in the inputs' order, appended as documents
  finish (flushed per document, fsynced every second), so a crash loses nothing that
  was written and a resumed run continues after the last complete line.
- `OUT.failed.jsonl`: `{"id", "path", "line", "reason"}` for each document whose
  requests failed after the generator's retries, also in input order. Failed documents
  are never silently dropped, and a resumed run does not request them again; annotate
  them again into another `--out` (e.g. from a list of their ids) to retry.
- `OUT.annotate.json`: the run's settings. A run finding `OUT` resumes only when every
  setting that shapes the output is the same (concurrency may change); otherwise it is
  refused naming what differs, and nothing is written.

The runner hands each document over when it reaches the head of the input order, so
what these files hold is always a prefix of the inputs, which a resumed run skips (by id).

**In a bucket** (`--out gs://BUCKET/NAME`), which has no append, `OUT` and
`OUT.failed.jsonl` are written with `metatrain.io.storage.ObjectAppender`: finished lines are
buffered and added to the object (one atomic compose) every 5 seconds as documents
finish, on SIGTERM and Ctrl-C, and at the end. A reader never sees part of a line, and a
run killed outright (`kill -9`, a lost machine) loses the lines not uploaded yet (at most
5 seconds' worth of finished documents), which a resumed run does again. Before a line
goes to one of the two objects, what is buffered for the other is uploaded, so what
reached the bucket is always a prefix of the inputs. `OUT.annotate.json` is written as one whole object. Since a
bucket's `OUT` never ends in a line cut short, one that does was changed by another
writer, and a resume refuses it instead of truncating it (as is done locally).

Here: `OutputSink` (appends to `OUT` and `OUT.failed.jsonl`), `finished_ids` (what an
earlier run wrote), `prepare_out` (the settings check that decides between a fresh run,
a resumed one and a refusal). What is annotated, and in which order it reaches the
sink, is `metatrain.annotate.runner`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from metatrain.annotate.inputs import RawDocument
from metatrain.errors import UserError
from metatrain.io.outputs import check_output_file, write_atomically
from metatrain.io.storage import ObjectAppender, StoragePath, as_path, is_remote

FAILED_SUFFIX = ".failed.jsonl"
SETTINGS_SUFFIX = ".annotate.json"
_FSYNC_SECONDS = 1.0
#: Seconds between uploads of the finished lines to `OUT` in a bucket.
_REMOTE_FLUSH_SECONDS = 5.0


class OutputSink:
    """The output and failure files, appended in input order (see the module docstring);
    in a bucket, two `ObjectAppender`s, of which at most one holds lines not uploaded."""

    def __init__(self, out: StoragePath):
        """Open `out` for appending (the failure file is opened when the first failure comes)."""
        self.out = out
        self.remote = is_remote(str(out))
        self.failed_path = as_path(str(out) + FAILED_SUFFIX)
        self._out: IO[str] | ObjectAppender = self._open(out)
        self._failed: IO[str] | ObjectAppender | None = None
        self._synced = time.monotonic()

    def _open(self, path: StoragePath) -> IO[str] | ObjectAppender:
        if self.remote:
            return ObjectAppender(path, flush_every_s=_REMOTE_FLUSH_SECONDS)
        return open(path, "a", encoding="utf-8")

    def write_record(self, record: dict[str, Any]) -> None:
        """Append an annotated document to `OUT`."""
        self._append(self._out, self._failed, json.dumps(record, ensure_ascii=False) + "\n")

    def write_failure(self, raw: RawDocument, reason: str | None) -> None:
        """Append a document that failed, and why, to `OUT.failed.jsonl` (created on first use)."""
        if self._failed is None:
            self._failed = self._open(self.failed_path)
        line = json.dumps({"id": raw.id, "path": raw.path, "line": raw.line, "reason": reason},
                          ensure_ascii=False) + "\n"
        self._append(self._failed, self._out, line)

    def _append(self, handle: IO[str] | ObjectAppender, other: IO[str] | ObjectAppender | None, line: str) -> None:
        if self.remote:
            if other is not None:
                other.flush()  # its lines come first in the input order: upload them before these
            handle.write(line)  # uploaded with the others every _REMOTE_FLUSH_SECONDS
            return
        handle.write(line)
        handle.flush()
        if time.monotonic() - self._synced > _FSYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        """Make what was written durable: fsync the files, or upload the buffered lines."""
        for handle in (self._out, self._failed):
            if handle is None:
                continue
            if self.remote:
                handle.flush()
            else:
                os.fsync(handle.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        """Make everything durable and close the files."""
        self.sync()
        self._out.close()
        if self._failed is not None:
            self._failed.close()


def finished_ids(out: str | os.PathLike) -> set[str]:
    """Ids already written to `out` and its failure list; locally a last line cut short by a
    crash is removed first (its document is done again).

    Raises:
        UserError: a line is not one annotate wrote; in a bucket (where annotate never
            leaves a line cut short) also a last line without its newline.
    """
    ids: set[str] = set()
    for path in (as_path(out), as_path(str(out) + FAILED_SUFFIX)):
        if not path.is_file():
            continue
        remote = is_remote(str(path))
        if not remote:
            _drop_partial_last_line(path)
        with path.open("rb") as handle:
            for number, line in enumerate(handle, 1):
                if remote and not line.endswith(b"\n"):
                    raise UserError(f"{path}:{number}: the last line is cut short, which annotate never "
                                    "writes in a bucket; another writer changed it. Restore it, or annotate "
                                    "into another --out")
                try:
                    text = line.decode("utf-8")
                    if not text.strip():
                        continue
                    ids.add(str(json.loads(text)["id"]))
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"{path}:{number}: not a line annotate wrote; it was changed by hand. "
                                    "Restore it, or annotate into another --out") from None
    return ids


def _drop_partial_last_line(path: Path) -> None:
    with open(path, "rb+") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        # Find the last newline and cut after it.
        position = size
        chunk = 1 << 16
        while position > 0:
            start = max(0, position - chunk)
            handle.seek(start)
            data = handle.read(position - start)
            cut = data.rfind(b"\n")
            if cut >= 0:
                handle.truncate(start + cut + 1)
                return
            position = start
        handle.truncate(0)


def prepare_out(out: StoragePath, identity: dict[str, Any], inputs: Iterable[str]) -> bool:
    """Check `out` and its settings file; returns True when resuming an earlier run.

    `out` is a local `Path` or a bucket's `epath.Path` (`as_path`); a fresh run writes
    the settings file as one object and creates `out` empty, in a bucket too.

    Raises:
        UserError: `out` is an input or not a regular file; `out` exists without a
            settings file (not annotate's); the settings differ from the earlier run's.
    """
    check_output_file(out, inputs=inputs, option="--out")
    settings_path = as_path(str(out) + SETTINGS_SUFFIX)
    if out.exists() or settings_path.exists():
        if not settings_path.is_file():
            raise UserError(f"--out {out} exists and was not written by annotate (no {settings_path.name}); "
                            "choose another --out")
        try:
            earlier = json.loads(settings_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{settings_path} is unreadable ({e}); choose another --out") from None
        differ = [f"{key}: {earlier.get(key)!r} -> {identity.get(key)!r}"
                  for key in sorted(set(earlier) | set(identity)) if earlier.get(key) != identity.get(key)]
        if differ:
            raise UserError(f"--out {out} was annotated with other settings ({'; '.join(differ[:4])}); "
                            "annotate into another --out, or run with the same settings to continue")
        return True
    write_atomically(settings_path, json.dumps(identity, indent=1, ensure_ascii=False) + "\n", option="--out")
    out.touch()
    return False
