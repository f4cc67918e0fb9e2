"""The files of an annotation run, and resuming into them.

Files (`OUT` is `--out`):

- `OUT`: one annotated document per line, in the inputs' order, appended as documents
  finish (flushed per document, fsynced every second), so a crash loses nothing that
  was written and a resumed run continues after the last complete line.
- `OUT.failed.jsonl`: `{"id", "path", "line", "reason", "status", "message"}` for each
  document whose requests failed after the generator's retries (`status`: the HTTP
  status or null, `message`: the server's own words or null), in input order within a
  run. It is a log, appended by every run: a document listed there and not in `OUT` is
  requested again by the next run of the same command; once it is in `OUT` it is done.
- `OUT.annotate.json`: the run's settings. A run finding `OUT` resumes only when every
  setting that shapes the output is the same (concurrency may change); otherwise it is
  refused naming what differs, and nothing is written.

The runner hands each document over when it reaches the head of the input order, so
`OUT` holds the inputs' documents in their order, except those that failed in an earlier
run and were written when a later run retried them. A resumed run checks this first
(`check_out_order`: every line an input's id, once, in the inputs' order unless it failed
before) and refuses a foreign, repeated or reordered line, naming it, before any request;
then it skips the documents of `OUT`.

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

Here: `OutputSink` (appends to `OUT` and `OUT.failed.jsonl`), `check_out_order` (what an
earlier run wrote, checked against the inputs), `prepare_out` (the settings check that decides between a fresh run,
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

from metatrain.annotate.generators import GenerationError
from metatrain.annotate.inputs import RawDocument
from metatrain.errors import UserError
from metatrain.io.outputs import check_output_file, write_atomically
from metatrain.io.storage import ObjectAppender, StoragePath, as_path, is_remote

FAILED_SUFFIX = ".failed.jsonl"
SETTINGS_SUFFIX = ".annotate.json"
_FSYNC_SECONDS = 1.0
#: Seconds between uploads of the finished lines to `OUT` in a bucket.
_REMOTE_FLUSH_SECONDS = 5.0


class DiscardSink:
    """What a process other than 0 of a multi-host run writes: nothing (process 0 writes
    the same records)."""

    def write_record(self, record: dict[str, Any]) -> None:
        pass

    def write_failure(self, raw: Any, error: Any) -> None:
        pass

    def close(self) -> None:
        pass


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

    def write_failure(self, raw: RawDocument, error: GenerationError) -> None:
        """Append a document that failed, why, and the server's own message, to
        `OUT.failed.jsonl` (created on first use)."""
        if self._failed is None:
            self._failed = self._open(self.failed_path)
        line = json.dumps({"id": raw.id, "path": raw.path, "line": raw.line, "reason": error.reason,
                           "status": error.status, "message": error.message}, ensure_ascii=False) + "\n"
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


def check_out_order(out: str | os.PathLike, input_ids: Iterable[str]) -> list[str]:
    """The ids written to `out`, after checking them against the inputs' ids (in order);
    locally a last line cut short by a crash is removed first (its document is done again).

    Every line must be a record annotate wrote, of a document of the inputs, written
    once, in the inputs' order; a document listed in `OUT.failed.jsonl` (it failed in an
    earlier run) may come later, where its retry wrote it.

    Raises:
        UserError: naming the first line that breaks this, and the fix; in a bucket (where
            annotate never leaves a line cut short) also a last line without its newline.
    """
    position: dict[str, int] = {}
    for i, doc_id in enumerate(input_ids):
        position.setdefault(doc_id, i)
    retried = set(_ids(as_path(str(out) + FAILED_SUFFIX)).values())
    fix = "restore it from the run that wrote it, or annotate into another --out"
    lines: dict[str, int] = {}
    last: tuple[int, str, int] | None = None  # (input position, id, line) of the last in-order line
    for number, doc_id in _ids(as_path(out)).items():
        if doc_id not in position:
            raise UserError(f"{out}:{number}: {doc_id!r} is not a document of the inputs; {fix}")
        if doc_id in lines:
            raise UserError(f"{out}:{number}: {doc_id!r} is written twice (first on line {lines[doc_id]}); {fix}")
        lines[doc_id] = number
        if doc_id in retried:
            continue
        if last is not None and position[doc_id] < last[0]:
            raise UserError(f"{out}:{number}: {doc_id!r} comes before {last[1]!r} (line {last[2]}) in the inputs, "
                            f"so the lines were reordered; {fix}")
        last = (position[doc_id], doc_id, number)
    for path in (as_path(out), as_path(str(out) + FAILED_SUFFIX)):
        if path.is_file() and not is_remote(str(path)):
            _drop_partial_last_line(path)  # only now: a refused --out is left exactly as it was
    return list(lines)


def _ids(path: StoragePath) -> dict[int, str]:
    """Line number -> id of each record of `path` (none when it does not exist)."""
    ids: dict[int, str] = {}
    if not path.is_file():
        return ids
    remote = is_remote(str(path))
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            if not remote and not line.endswith(b"\n"):
                continue  # cut short by a crash: removed once the rest is found in order
            if remote and not line.endswith(b"\n"):
                raise UserError(f"{path}:{number}: the last line is cut short, which annotate never "
                                "writes in a bucket; another writer changed it. Restore it, or annotate "
                                "into another --out")
            try:
                text = line.decode("utf-8")
                if not text.strip():
                    continue
                ids[number] = str(json.loads(text)["id"])
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


#: Generator settings that say where it is, not what it writes: not compared on resume
#: (a restarted server may listen elsewhere; runs before this rule stored them).
ADDRESS_SETTINGS = frozenset({"base_url"})


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
        if isinstance(earlier.get("settings"), dict):
            earlier["settings"] = {k: v for k, v in earlier["settings"].items() if k not in ADDRESS_SETTINGS}
        differ = [f"{key}: {earlier.get(key)!r} -> {identity.get(key)!r}"
                  for key in sorted(set(earlier) | set(identity)) if earlier.get(key) != identity.get(key)]
        if differ:
            raise UserError(f"--out {out} was annotated with other settings ({'; '.join(differ[:4])}); "
                            "annotate into another --out, or run with the same settings to continue")
        return True
    write_atomically(settings_path, json.dumps(identity, indent=1, ensure_ascii=False) + "\n", option="--out")
    out.touch()
    return False
