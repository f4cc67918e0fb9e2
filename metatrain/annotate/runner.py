"""The annotation run: documents in, thoughts requested and checked, documents out, in order.

The files it writes (`OUT`, `OUT.failed.jsonl`, `OUT.annotate.json`), in a bucket too,
and how a run resumes into them are `metatrain.annotate.output`. Each output line and
each failure is written when its document reaches the head of the input order. A resumed
run first checks `OUT` against the inputs (`check_out_order`), then skips exactly the
documents written to `OUT` (by id): a document that failed is asked for again, one that
was written never. SIGTERM and Ctrl-C stop new requests, write the finished documents,
and end with status 75 and 130; run the same command again to continue.

Before anything is written the generator checks what it can (`prepare`, with the run's
first request as an example). A run that had documents to do and wrote none of them, or
whose every request failed, ends with an error (`raise_if_nothing_done`): status 2 when
the last failure was the user's settings or credentials (an HTTP 4xx), 74 when the
endpoint failed.

Within a document the points are requested one after another (the context of a point
includes the thoughts accepted before it); `concurrency` documents are in flight at once.
With `--samples K` (`metatrain.annotate.selection`) each point asks for K candidates at
once (so a local model decodes them in one batch), checks each, scores the survivors by
their gain (`metatrain.annotate.gain`, in a thread: other documents keep decoding) and
keeps one by `--select`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import itertools
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from metatrain.annotate.checks import BlockChecks
from metatrain.annotate.generators import (
    GenerationError,
    ThinkRequest,
    ThoughtGenerator,
)
from metatrain.annotate.inputs import RawDocument
from metatrain.annotate.output import (
    ADDRESS_SETTINGS,
    FAILED_SUFFIX,
    DiscardSink,
    OutputSink,
    check_out_order,
    prepare_out,
)
from metatrain.annotate.placement import (
    PlacementConfig,
    assemble,
    context_at,
    plan_insertions,
)
from metatrain.annotate.prompts import PromptTemplate
from metatrain.annotate.selection import (
    GainTotals,
    SelectionConfig,
    candidate_seed,
    choose,
    point_entry,
    selection_provenance,
)
from metatrain.documents import Segment, parse_document
from metatrain.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, FaultError, UserError
from metatrain.io.storage import absolute, as_path


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Everything that shapes the output (compared on resume), and what does not."""

    placement: PlacementConfig
    template: PromptTemplate
    checks: BlockChecks
    retries: int = 2
    seed: int = 0
    concurrency: int = 8  # not compared: it changes speed, not the output
    selection: SelectionConfig | None = None  # None: one thought per point, no gains (no selection flag given)

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise UserError(f"--retries must be >= 0, got {self.retries}")
        if self.concurrency < 1:
            raise UserError(f"--concurrency must be >= 1, got {self.concurrency}")

    def identity(self, generator: ThoughtGenerator, inputs: Iterable[str]) -> dict[str, Any]:
        """The JSON written to `OUT.annotate.json` and compared on resume: the model and
        the sampling, not the endpoint's address (a restarted server may listen elsewhere)."""
        p = self.placement
        sampling = {k: v for k, v in generator.settings.items() if k not in ADDRESS_SETTINGS}
        return {
            "inputs": [str(absolute(i)) for i in inputs],
            "where": p.where, "split": p.split, "max_blocks": p.max_blocks, "order": p.effective_order,
            "replace_thinking": p.replace_thinking, "seed": self.seed,
            "prompt_sha256": self.template.sha256, "context_chars": self.template.context_chars,
            "min_chars": self.checks.min_chars, "max_chars": self.checks.max_chars,
            "filter": self.checks.filter_name, "retries": self.retries,
            "generator": generator.kind, "model": generator.model, "settings": sampling,
        } | ({"selection": self.selection.identity()} if self.selection is not None else {})

    @property
    def samples(self) -> int:
        return self.selection.samples if self.selection is not None else 1


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
    gains: GainTotals = dataclasses.field(default_factory=GainTotals)

    def add(self, other: "BlockCounts") -> None:
        for field in dataclasses.fields(BlockCounts):
            if field.name not in ("rejections", "gains"):
                setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
        self.rejections.update(other.rejections)
        self.gains.add(other.gains)


@dataclasses.dataclass
class RunSummary(BlockCounts):
    """What a run did (this invocation; `resumed` counts documents found done)."""

    documents: int = 0
    failed: int = 0
    replies: int = 0  # requests answered (the failed ones are `failed`: one per failed document)
    last_error: GenerationError | None = None
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
        g = self.gains.statistics()
        if g["candidate_gain_mean"] is not None:
            chosen = f"{g['chosen_gain_mean']:+.4f}" if g["chosen_gain_mean"] is not None else "n/a"
            lines.append(f"gains (nats over the next text): chosen mean {chosen} ({self.gains.chosen} blocks), "
                         f"candidate mean {g['candidate_gain_mean']:+.4f} ({self.gains.candidates} candidates), "
                         f"{100 * g['positive_gain_share']:.1f}% positive")
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
    error: GenerationError | None = None
    replies: int = 0
    selection: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # per point (with --samples)


def derive_seed(seed: int, doc_id: str, point: int, attempt: int) -> int:
    """A 31-bit seed for one request, stable across runs (never Python's `hash`)."""
    digest = hashlib.sha256(f"{seed}\0{doc_id}\0{point}\0{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _text(segments: Iterable[Segment]) -> str:
    return "".join(s.text for s in segments if s.kind == "text")


def mantra_pattern(mantra: str) -> re.Pattern[str] | None:
    """Matches `mantra` restated in a reply, whatever whitespace separates its words."""
    words = mantra.split()
    return re.compile(r"\s+".join(re.escape(w) for w in words), re.IGNORECASE) if words else None


def without_mantra(text: str, pattern: re.Pattern[str] | None) -> str:
    """`text` with every restatement of the mantra removed, stripped. The encoder adds the
    mantra to the blocks that get one; a thought that restates it would carry it twice."""
    return text if pattern is None else pattern.sub("", text).strip()


class Annotator:
    """Annotates documents with one generator under one set of settings."""

    def __init__(self, generator: ThoughtGenerator, settings: RunSettings, tokenizer: Any = None,
                 thinking_modes: tuple[str, ...] | None = None, mantra: str | None = None,
                 gain_scorer: Any = None):
        self.generator = generator
        self.settings = settings
        self.gain_scorer = gain_scorer  # `metatrain.annotate.gain.GainScorer`, or None: no gains
        self.tokenizer = tokenizer
        if thinking_modes is None:  # where the shipped grammar lets a thinking block open
            from metatrain.tokenizer.registry import load_registry

            thinking_modes = load_registry().thinking_modes
        self.thinking_modes = thinking_modes
        if mantra is None:  # the generator's (a checkpoint's own), else the one the encoder adds by default
            from metatrain.tokenizer.mantra import DEFAULT_MANTRA

            mantra = getattr(generator, "mantra", None) or DEFAULT_MANTRA
        self._mantra = mantra_pattern(mantra)
        self._semaphore: asyncio.Semaphore | None = None

    def requests(self, raw: RawDocument) -> Iterator[tuple[int, int, str, tuple[Segment, ...]]]:
        """`(point, points, message, context)` of each insertion point of `raw`, the
        thoughts before it left out (what the first attempt of each point would send when
        none was accepted)."""
        s = self.settings
        points = plan_insertions(raw, s.placement, self.tokenizer, thinking_modes=self.thinking_modes)
        for k, point in enumerate(points):
            context = context_at(raw, points, k, [None] * k, s.placement)
            message = s.template.render(passage=point.passage, document_so_far=_text(context), document=raw.text,
                                        doc_id=raw.id, metadata=raw.metadata, position=point.position,
                                        point=k, points=len(points))
            yield k, len(points), message, context

    def example_request(self, raw: RawDocument | None) -> ThinkRequest | None:
        """The first request a run would send for `raw` (for the generator's checks)."""
        for k, _, message, context in self.requests(raw) if raw is not None else ():
            return ThinkRequest(raw.id, k, ({"role": "user", "content": message},), context, 0,
                                derive_seed(self.settings.seed, raw.id, k, 0), raw.mode)
        return None

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
            kept: list[str | None] = [None] * s.samples
            for attempt in range(s.retries + 1):
                requests = [ThinkRequest(raw.id, k, ({"role": "user", "content": message},), context, attempt,
                                         candidate_seed(s.seed, raw.id, k, attempt, c), raw.mode)
                            for c in range(s.samples)]
                try:
                    replies = await self._ask_all(requests)
                except GenerationError as e:
                    e.reason = f"point {k + 1} of {len(points)}: {e.reason}"
                    done.error = e
                    return done
                kept = [None] * s.samples
                rejected = False
                for c, reply in enumerate(replies):
                    done.replies += 1
                    done.tokens_in += reply.tokens_in
                    done.tokens_out += reply.tokens_out
                    text = without_mantra(reply.text.strip(), self._mantra)
                    if not text:
                        done.empty += 1
                        continue
                    why = s.checks.rejection(text, check_context, whole)
                    if why is None:
                        kept[c] = text
                    else:
                        rejected = True
                        done.rejected += 1
                        done.rejections[why] += 1
                if any(t is not None for t in kept) or not rejected:
                    break  # a candidate passed, or the generator said "no thinking here"
            thought = await self._select(raw, points, k, context, thoughts, kept, done)
            if thought is not None:
                done.accepted += 1
            thoughts.append(thought)
        segments = assemble(raw, points, thoughts, s.placement)
        done.record = self._record(raw, segments, done)
        return done

    async def _ask_all(self, requests: list[ThinkRequest]) -> list[Any]:
        """The replies to `requests`, asked at once (one failure cancels the others)."""
        assert self._semaphore is not None

        async def ask(request: ThinkRequest) -> Any:
            async with self._semaphore:
                return await self.generator.think(request)

        if len(requests) == 1:
            return [await ask(requests[0])]
        tasks = [asyncio.ensure_future(ask(r)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _select(self, raw: RawDocument, points: list, k: int, context: tuple[Segment, ...],
                      thoughts: list[str | None], kept: list[str | None], done: _Done) -> str | None:
        """The candidate kept at point k (None: none passed), its gains scored and recorded
        when the run selects (`--samples`, `--select`, `--scorer`)."""
        s = self.settings
        survivors = [c for c, t in enumerate(kept) if t is not None]
        if s.selection is None:
            return kept[survivors[0]] if survivors else None
        gains: list[float | None] = [None] * len(kept)
        if survivors and self.gain_scorer is not None:
            following = self._following(raw, points, k, thoughts, len(context))
            gains = await asyncio.to_thread(self.gain_scorer.gains, raw.id, raw.mode, context, kept, following)
        chosen = choose(s.selection.select, survivors, gains, seed=s.seed, doc_id=raw.id, point=k,
                        min_gain=s.selection.min_gain)
        entry = point_entry(k, gains, chosen)
        done.selection.append(entry)
        done.gains.add_point(entry)
        return kept[chosen] if chosen is not None else None

    def _following(self, raw: RawDocument, points: list, k: int, thoughts: list[str | None],
                   before: int) -> tuple[Segment, ...]:
        """The document after point k up to the next point (or the end), as segments."""
        mark = "\0candidate\0"
        with_mark = [*thoughts[:k], mark]
        if k + 1 < len(points):
            segments = context_at(raw, points, k + 1, with_mark, self.settings.placement)
        else:
            segments = assemble(raw, points, with_mark, self.settings.placement)
        if segments[before:before + 1] != (Segment("thinking", mark),):
            raise AssertionError(f"document {raw.id!r}: point {k} is not where its context ends; "
                                 "this is a bug in metatrain")
        return segments[before + 1:]

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
        if s.selection is not None:
            scorer = self.gain_scorer.source if self.gain_scorer is not None else None
            provenance["selection"] = selection_provenance(s.selection, scorer, done.selection)
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

    async def run(self, documents: Iterator[RawDocument], sink: OutputSink, summary: RunSummary,
                  progress: Any = None) -> None:
        """Annotate `documents` (the finished ones already removed) into `sink`, in order."""
        # Each document in flight asks for its K candidates at once.
        self._semaphore = asyncio.Semaphore(self.settings.concurrency * self.settings.samples)
        window = 2 * self.settings.concurrency + 4
        pending: collections.deque[asyncio.Task] = collections.deque()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        previous = {}  # the command's own handlers (the CLI's), put back after the run
        for signum, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            try:
                previous[signum] = signal.getsignal(signum)
                loop.add_signal_handler(signum, lambda n=name: (setattr(summary, "stopped", n), stop.set()))
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                previous.pop(signum, None)
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
            for signum, handler in previous.items():
                try:
                    loop.remove_signal_handler(signum)  # it leaves the default handler, not the CLI's
                    signal.signal(signum, handler)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass

    async def _write_head(self, pending, sink: OutputSink, summary: RunSummary, progress, stop: asyncio.Event) -> None:
        head = pending[0]
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait({head, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not head.done():
            return  # stopped while waiting
        pending.popleft()
        done: _Done = head.result()
        if done.record is not None:
            sink.write_record(done.record)
        else:
            assert done.raw is not None and done.error is not None
            sink.write_failure(done.raw, done.error)
        summary.add(done)
        summary.replies += done.replies
        if done.record is None:
            summary.failed += 1
            summary.last_error = done.error
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


def run_annotation(
    documents: Iterable[RawDocument],
    generator: ThoughtGenerator,
    settings: RunSettings,
    out: str | Path,
    *,
    inputs: Iterable[str],
    input_ids: Callable[[], Iterable[str]] | None = None,
    tokenizer: Any = None,
    progress: bool = False,
    gain_scorer: Any = None,
) -> RunSummary:
    """Annotate `documents` into `out` (a local path or `gs://BUCKET/NAME`), resuming an
    earlier run of the same settings.

    Args:
        input_ids: reads the inputs' ids again, in order (to check `out` on resume before
            any request); None: `documents` is read into memory when resuming.
        gain_scorer: scores candidate thoughts (`metatrain.annotate.gain.GainScorer`;
            with `settings.selection`), or None.

    Returns the summary; `summary.stopped` is set when SIGTERM or Ctrl-C ended it early.

    Raises:
        UserError: the generator's checks, a refused resume (other settings, an `out`
            that does not match the inputs); nothing is written then.
        FaultError: the generator cannot reach its endpoint.
    """
    out = as_path(out)
    inputs = list(inputs)
    annotator = Annotator(generator, settings, tokenizer, gain_scorer=gain_scorer)
    documents = iter(documents)
    first = next(documents, None)
    documents = itertools.chain([first] if first is not None else [], documents)
    summary = RunSummary()
    bar = None
    start = time.perf_counter()

    async def run() -> None:
        nonlocal documents, bar
        try:
            await generator.prepare(annotator.example_request(first))
            # A multi-host generator (`metatrain`, under `launch local`): every process
            # annotates the same documents; process 0 prepares and writes `out`, the others
            # read which documents it holds once it is ready, and write nothing.
            barrier = getattr(generator, "barrier", None)
            writes = getattr(generator, "process_index", 0) == 0
            if writes:
                resumed = prepare_out(out, settings.identity(generator, inputs), inputs)
            if barrier is not None:
                barrier("annotate: out prepared")
            if not writes:
                resumed = prepare_out(out, settings.identity(generator, inputs), inputs)
            finished: set[str] = set()
            if resumed:
                if input_ids is None:
                    materialized = list(documents)
                    documents = iter(materialized)
                    ids: Iterable[str] = [raw.id for raw in materialized]
                else:
                    ids = input_ids()
                finished = set(check_out_order(out, ids))
            summary.resumed = len(finished)
            todo = (raw for raw in documents if raw.id not in finished)
            if barrier is not None:
                barrier("annotate: resume read")  # before process 0 appends anything
            if progress and writes:
                from tqdm import tqdm

                bar = tqdm(desc="annotating", unit="doc", file=sys.stderr, mininterval=0.5)
            sink = OutputSink(out) if writes else DiscardSink()
            try:
                await annotator.run(todo, sink, summary, bar)
            finally:
                sink.close()
        finally:
            await generator.aclose()

    try:
        asyncio.run(run())
    finally:
        if bar is not None:
            bar.close()
        summary.seconds = time.perf_counter() - start
    return summary


def raise_if_nothing_done(summary: RunSummary, out: str | os.PathLike) -> None:
    """Fail a run that had documents to do and wrote none, whose every request failed, or
    whose input held no valid document at all (a resume that finds everything done is fine).

    Raises:
        UserError: the input held no valid document, or the last failure was the user's
            settings or credentials (HTTP 4xx).
        FaultError: the endpoint failed (5xx, timeouts, dropped connections).
    """
    if summary.stopped:
        return
    if not (summary.documents or summary.failed or summary.resumed):
        skipped = f" ({summary.skipped_records} bad records skipped, see the warnings)" if summary.skipped_records else ""
        raise UserError(f"the input holds no document to annotate{skipped}, so nothing was written to {out}; "
                        "give JSON Lines documents with an id and text, or .txt files")
    error = summary.last_error
    if error is None or (summary.documents and summary.replies):
        return
    what = "no document was annotated" if not summary.documents else "every request failed"
    message = (f"{what}: all {summary.failed} attempted documents failed, the last with {error.reason} "
               f"(each listed with the server's message in {out}{FAILED_SUFFIX}); "
               + ("fix the settings or the key and" if error.settings else "when the endpoint works again,")
               + " run the same command again to retry them")
    raise UserError(message) if error.settings else FaultError(message)


def exit_status(summary: RunSummary) -> int:
    """0, or 75 after SIGTERM and 130 after Ctrl-C (the finished documents are written)."""
    if summary.stopped == "SIGTERM":
        return EXIT_PREEMPTED
    if summary.stopped == "SIGINT":
        return EXIT_INTERRUPTED
    return 0
