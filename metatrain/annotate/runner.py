"""The annotation run: documents in, thoughts requested and checked, documents out, in order.

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

Each output line and each failure is written when its document reaches the head of the
input order, so the finished documents are always a prefix of the inputs: a resumed run
skips exactly those (by id) and requests nothing twice. SIGTERM and Ctrl-C stop new
requests, write the finished prefix, and end with status 75 and 130; run the same
command again to continue.

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

Within a document the points are requested one after another (the context of a point
includes the thoughts accepted before it); `concurrency` documents are in flight at once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from metatrain.annotate.checks import BlockChecks
from metatrain.annotate.generators import GenerationError, ThinkRequest, ThoughtGenerator
from metatrain.annotate.inputs import RawDocument
from metatrain.annotate.placement import PlacementConfig, assemble, context_at, plan_insertions
from metatrain.annotate.prompts import PromptTemplate
from metatrain.documents import Segment, parse_document
from metatrain.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, UserError
from metatrain.io.outputs import check_output_file, write_atomically
from metatrain.io.storage import ObjectAppender, StoragePath, absolute, as_path, is_remote

FAILED_SUFFIX = ".failed.jsonl"
SETTINGS_SUFFIX = ".annotate.json"
_FSYNC_SECONDS = 1.0
#: Seconds between uploads of the finished lines to `OUT` in a bucket.
_REMOTE_FLUSH_SECONDS = 5.0


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Everything that shapes the output (compared on resume), and what does not."""

    placement: PlacementConfig
    template: PromptTemplate
    checks: BlockChecks
    retries: int = 2
    seed: int = 0
    concurrency: int = 8  # not compared: it changes speed, not the output

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise UserError(f"--retries must be >= 0, got {self.retries}")
        if self.concurrency < 1:
            raise UserError(f"--concurrency must be >= 1, got {self.concurrency}")

    def identity(self, generator: ThoughtGenerator, inputs: Iterable[str]) -> dict[str, Any]:
        """The JSON written to `OUT.annotate.json` and compared on resume."""
        p = self.placement
        return {
            "inputs": [str(absolute(i)) for i in inputs],
            "where": p.where, "split": p.split, "max_blocks": p.max_blocks, "order": p.effective_order,
            "replace_thinking": p.replace_thinking, "seed": self.seed,
            "prompt_sha256": self.template.sha256, "context_chars": self.template.context_chars,
            "min_chars": self.checks.min_chars, "max_chars": self.checks.max_chars,
            "filter": self.checks.filter_name, "retries": self.retries,
            "generator": generator.kind, "model": generator.model, "settings": generator.settings,
        }


@dataclasses.dataclass
class BlockCounts:
    """Insertion points, what came of them, and the tokens it took."""

    points: int = 0
    accepted: int = 0
    rejected: int = 0
    empty: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    rejections: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add(self, other: "BlockCounts") -> None:
        for field in dataclasses.fields(BlockCounts):
            if field.name != "rejections":
                setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
        self.rejections.update(other.rejections)


@dataclasses.dataclass
class RunSummary(BlockCounts):
    """What a run did (this invocation; `resumed` counts documents found done)."""

    documents: int = 0
    failed: int = 0
    resumed: int = 0
    skipped_records: int = 0
    stopped: str | None = None  # "SIGTERM" or "SIGINT" when the run was stopped
    seconds: float = 0.0

    def render(self, out: str | os.PathLike) -> str:
        rate = self.documents / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"annotated {self.documents} documents into {out} ({rate:.2f} documents/s)"
            + (f"; {self.resumed} were done already" if self.resumed else ""),
            f"blocks: {self.accepted} accepted, {self.rejected} rejected, {self.empty} empty replies, "
            f"at {self.points} points; tokens in {self.tokens_in:,}, out {self.tokens_out:,}",
        ]
        if self.rejections:
            lines.append("rejected: " + ", ".join(f"{why} ({n})" for why, n in self.rejections.most_common(5)))
        if self.failed:
            lines.append(f"failed: {self.failed} documents, listed with the reason in {out}{FAILED_SUFFIX}")
        if self.skipped_records:
            lines.append(f"skipped {self.skipped_records} bad input records (see the warnings)")
        if self.stopped:
            lines.append(f"stopped by {self.stopped}: run the same command again to continue")
        return "\n".join(lines)


@dataclasses.dataclass
class _Done(BlockCounts):
    """One document's outcome: its output record, or the reason it failed."""

    raw: RawDocument | None = None
    record: dict[str, Any] | None = None
    reason: str | None = None


def derive_seed(seed: int, doc_id: str, point: int, attempt: int) -> int:
    """A 31-bit seed for one request, stable across runs (never Python's `hash`)."""
    digest = hashlib.sha256(f"{seed}\0{doc_id}\0{point}\0{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _text(segments: Iterable[Segment]) -> str:
    return "".join(s.text for s in segments if s.kind == "text")


class Annotator:
    """Annotates documents with one generator under one set of settings."""

    def __init__(self, generator: ThoughtGenerator, settings: RunSettings, tokenizer: Any = None,
                 thinking_modes: tuple[str, ...] | None = None):
        self.generator = generator
        self.settings = settings
        self.tokenizer = tokenizer
        if thinking_modes is None:  # where the shipped grammar lets a thinking block open
            from metatrain.tokenizer.registry import load_registry

            thinking_modes = load_registry().thinking_modes
        self.thinking_modes = thinking_modes
        self._semaphore: asyncio.Semaphore | None = None

    async def annotate_document(self, raw: RawDocument) -> _Done:
        """Plan the points, request and check a thought for each, assemble the document."""
        s = self.settings
        points = plan_insertions(raw, s.placement, self.tokenizer, thinking_modes=self.thinking_modes)
        done = _Done(raw=raw, points=len(points))
        thoughts: list[str | None] = []
        whole = raw.text
        for k, point in enumerate(points):
            context = context_at(raw, points, k, thoughts, s.placement)
            so_far = _text(context)
            message = s.template.render(passage=point.passage, document_so_far=so_far, document=whole,
                                        doc_id=raw.id, metadata=raw.metadata, position=point.position,
                                        point=k, points=len(points))
            check_context = {"id": raw.id, "point": k, "passage": point.passage,
                             "document_so_far": so_far, "metadata": raw.metadata}
            thought = None
            for attempt in range(s.retries + 1):
                request = ThinkRequest(raw.id, k, ({"role": "user", "content": message},), context,
                                       attempt, derive_seed(s.seed, raw.id, k, attempt), raw.mode)
                assert self._semaphore is not None
                try:
                    async with self._semaphore:
                        reply = await self.generator.think(request)
                except GenerationError as e:
                    done.reason = f"point {k + 1} of {len(points)}: {e.reason}"
                    return done
                done.tokens_in += reply.tokens_in
                done.tokens_out += reply.tokens_out
                text = reply.text.strip()
                if not text:
                    done.empty += 1
                    break
                why = s.checks.rejection(text, check_context, whole)
                if why is None:
                    thought = text
                    done.accepted += 1
                    break
                done.rejected += 1
                done.rejections[why] += 1
            thoughts.append(thought)
        segments = assemble(raw, points, thoughts, s.placement)
        done.record = self._record(raw, segments, done)
        return done

    def _record(self, raw: RawDocument, segments: tuple[Segment, ...], done: _Done) -> dict[str, Any]:
        s, g = self.settings, self.generator
        provenance: dict[str, Any] = {
            "generator": g.kind, "model": g.model, "settings": g.settings,
            "prompt": Path(s.template.source).name, "prompt_sha256": s.template.sha256,
            "where": s.placement.where, "split": s.placement.split, "order": s.placement.effective_order,
            "max_blocks": s.placement.max_blocks, "seed": s.seed, "filter": s.checks.filter_name,
            "points": done.points, "accepted": done.accepted, "rejected": done.rejected,
            "empty": done.empty, "tokens_in": done.tokens_in, "tokens_out": done.tokens_out,
        }
        metadata = dict(raw.metadata)
        if isinstance(metadata.get("annotation"), dict):
            provenance["previous"] = metadata.pop("annotation")  # the generation before this one
        record: dict[str, Any] = {"id": raw.id, "segments": [_segment_json(seg) for seg in segments]}
        if raw.mode != "human":
            record["mode"] = raw.mode
        record.update({k: v for k, v in metadata.items() if k not in ("id", "segments", "mode", "annotation")})
        record["annotation"] = provenance
        parse_document(record, path=raw.path, line=raw.line)  # what we write, `encode` reads
        if _text(segments) != raw.text:  # the contract: annotation never changes the text
            raise AssertionError(f"annotation changed the text of {raw.id!r}; this is a bug in metatrain")
        return record

    async def run(self, documents: Iterator[RawDocument], sink: "_Sink", summary: RunSummary,
                  progress: Any = None) -> None:
        """Annotate `documents` (the finished ones already removed) into `sink`, in order."""
        self._semaphore = asyncio.Semaphore(self.settings.concurrency)
        window = 2 * self.settings.concurrency + 4
        pending: collections.deque[asyncio.Task] = collections.deque()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            try:
                loop.add_signal_handler(signum, lambda n=name: (setattr(summary, "stopped", n), stop.set()))
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        try:
            for raw in documents:
                if stop.is_set():
                    break
                pending.append(asyncio.create_task(self.annotate_document(raw)))
                while len(pending) >= window and not stop.is_set():
                    await self._write_head(pending, sink, summary, progress, stop)
            while pending and not stop.is_set():
                await self._write_head(pending, sink, summary, progress, stop)
        finally:
            for task in pending:  # stopped: unfinished documents are redone on resume
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for signum in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.remove_signal_handler(signum)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass

    async def _write_head(self, pending, sink: "_Sink", summary: RunSummary, progress, stop: asyncio.Event) -> None:
        head = pending[0]
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait({head, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not head.done():
            return  # stopped while waiting
        pending.popleft()
        done: _Done = head.result()
        sink.write(done)
        summary.add(done)
        if done.record is None:
            summary.failed += 1
        else:
            summary.documents += 1
        if progress is not None:
            progress.update(1)
            elapsed = max(progress.format_dict.get("elapsed", 0.0), 1e-9)
            progress.set_postfix(tok_s=f"{(summary.tokens_in + summary.tokens_out) / elapsed:,.0f}",
                                 failed=summary.failed)


def _segment_json(seg: Segment) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": seg.kind, "text": seg.text}
    if seg.mode is not None:
        out["mode"] = seg.mode
    if seg.control is not None:
        out["control"] = seg.control
    return out


class _Sink:
    """The output and failure files, appended in input order (see the module docstring);
    in a bucket, two `ObjectAppender`s, of which at most one holds lines not uploaded."""

    def __init__(self, out: StoragePath):
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

    def write(self, done: _Done) -> None:
        if done.record is not None:
            handle, other = self._out, self._failed
            line = json.dumps(done.record, ensure_ascii=False) + "\n"
        else:
            if self._failed is None:
                self._failed = self._open(self.failed_path)
            handle, other = self._failed, self._out
            line = json.dumps({"id": done.raw.id, "path": done.raw.path, "line": done.raw.line,
                               "reason": done.reason}, ensure_ascii=False) + "\n"
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


def run_annotation(
    documents: Iterable[RawDocument],
    generator: ThoughtGenerator,
    settings: RunSettings,
    out: str | Path,
    *,
    inputs: Iterable[str],
    tokenizer: Any = None,
    progress: bool = False,
) -> RunSummary:
    """Annotate `documents` into `out` (a local path or `gs://BUCKET/NAME`), resuming an
    earlier run of the same settings.

    Returns the summary; `summary.stopped` is set when SIGTERM or Ctrl-C ended it early.
    """
    out = as_path(out)
    inputs = list(inputs)
    resumed = prepare_out(out, settings.identity(generator, inputs), inputs)
    finished = finished_ids(out) if resumed else set()
    summary = RunSummary(resumed=len(finished))

    def todo() -> Iterator[RawDocument]:
        for raw in documents:
            if raw.id not in finished:
                yield raw

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="annotating", unit="doc", file=sys.stderr, mininterval=0.5)
    sink = _Sink(out)
    start = time.perf_counter()
    try:
        asyncio.run(_run(Annotator(generator, settings, tokenizer), todo(), sink, summary, bar, generator))
    finally:
        sink.close()
        if bar is not None:
            bar.close()
        summary.seconds = time.perf_counter() - start
    return summary


async def _run(annotator: Annotator, documents, sink, summary, bar, generator) -> None:
    try:
        await annotator.run(documents, sink, summary, bar)
    finally:
        await generator.aclose()


def exit_status(summary: RunSummary) -> int:
    """0, or 75 after SIGTERM and 130 after Ctrl-C (the finished documents are written)."""
    if summary.stopped == "SIGTERM":
        return EXIT_PREEMPTED
    if summary.stopped == "SIGINT":
        return EXIT_INTERRUPTED
    return 0
